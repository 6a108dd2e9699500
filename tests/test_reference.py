"""The float64 reference against hand-worked cases and the spec's identities (docs/design.md)."""
import math

import pytest
import torch

import delta_kernels as dk
from delta_kernels.naive import delta_coefficients_naive
from helpers import as64, make_batch

F64 = torch.float64


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def tiny_case():
    """Six tokens, H = 2, p = 0.5 everywhere so v = (1 - 0.5) h = h / 2.

    t  v        adv  mask
    0  (1, 0)   +1   1
    1  (3, 0)   +1   1
    2  (-1, 0)  -1   1
    3  (-3, 0)  -1   1
    4  (0, 1)    0   1
    5  (5, 5)   +1   0   (padding: must not count anywhere)
    """
    v = torch.tensor([[1, 0], [3, 0], [-1, 0], [-3, 0], [0, 1], [5, 5]], dtype=F64)
    logp = torch.full((6,), math.log(0.5), dtype=F64)
    adv = torch.tensor([1, 1, -1, -1, 0, 1], dtype=F64)
    mask = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    return 2 * v, logp, adv, mask


def test_hand_worked_k0():
    # mu+ = (1*(1,0) + 1*(3,0)) / 2 = (2, 0); mu- = (-2, 0).
    # W = (4, 0), b = -(4 - 4)/2 = 0, m = 2 (v.W + b) = 8 v_x = [8, 24, -8, -24, 0, 40].
    # gamma+ = std{8, 24} = 8; gamma- = std{-(-8), -(-24)} = 8.
    # coef before normalisation: 0.8 + 0.4 sigmoid(m/8) on P, 0.8 + 0.4 sigmoid(-m/8) on Q,
    # 0.8 on t4, 0 on t5; normalised by 5 / sum.
    h, logp, adv, mask = tiny_case()
    r = dk.delta_coefficients(h, logp, adv, mask, k=0, backend="torch")
    raw = [0.8 + 0.4 * sig(1), 0.8 + 0.4 * sig(3), 0.8 + 0.4 * sig(1), 0.8 + 0.4 * sig(3), 0.8, 0.0]
    expected = torch.tensor(raw, dtype=F64) * 5 / sum(raw)
    torch.testing.assert_close(r.coef, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.stats.mu_pos, torch.tensor([2.0, 0.0], dtype=F64))
    torch.testing.assert_close(r.stats.mu_neg, torch.tensor([-2.0, 0.0], dtype=F64))
    assert r.stats.gamma_pos.item() == pytest.approx(8.0) and r.stats.gamma_neg.item() == pytest.approx(8.0)
    assert r.stats.b.item() == pytest.approx(0.0)
    # pred = sign(adv) (v.W + b) mask = [4, 12, 4, 12, 0, 0]
    torch.testing.assert_close(r.stats.pred, torch.tensor([4, 12, 4, 12, 0, 0], dtype=F64))
    assert r.coef[mask].mean().item() == pytest.approx(1.0, abs=1e-14)
    torch.testing.assert_close(r.weighted_advantages, adv * expected * mask)
    assert (r.stats.n_pos.item(), r.stats.n_neg.item(), r.stats.n_valid.item()) == (2, 2, 5)


def test_hand_worked_k1():
    # Step 1 gates with mu0 and gamma0 = 8: P: sigmoid(1), sigmoid(3); Q: the same by symmetry.
    # mu1+ = ((s1 * 1 + s3 * 3) / (s1 + s3), 0) = (c, 0), mu1- = (-c, 0); the temperature after
    # the step is the std of the margins of mu0 (= 8 again). Final: W = (2c, 0), b = 0,
    # m = 4 c v_x, gates sigmoid(4c/8) and sigmoid(12c/8).
    h, logp, adv, mask = tiny_case()
    s1, s3 = sig(1), sig(3)
    c = (s1 + 3 * s3) / (s1 + s3)
    raw = [0.8 + 0.4 * sig(c / 2), 0.8 + 0.4 * sig(3 * c / 2)] * 2 + [0.8, 0.0]
    expected = torch.tensor(raw, dtype=F64) * 5 / sum(raw)
    r = dk.delta_coefficients(h, logp, adv, mask, k=1, backend="torch")
    torch.testing.assert_close(r.coef, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.stats.mu_pos, torch.tensor([c, 0.0], dtype=F64))
    assert r.stats.gamma_pos.item() == pytest.approx(8.0)


def _side_std(m, side):
    x = m[side]
    return ((x - x.mean()) ** 2).mean().sqrt()


@pytest.mark.parametrize("k", [2, 3])
def test_temperature_lags_centroids_by_one_step(k):
    h, logp, adv, mask = as64(*make_batch(6, 8, 5, seed=10 + k, seq_level=False))
    v = dk.token_sketch(h, logp, backend="torch")
    prev = dk.delta_coefficients(h, logp, adv, mask, k=k - 1, backend="torch").stats
    cur = dk.delta_coefficients(h, logp, adv, mask, k=k, backend="torch").stats
    pos, neg = mask & (adv > 0), mask & (adv < 0)
    m_prev = 2 * (v @ prev.W + prev.b)
    m_cur = 2 * (v @ cur.W + cur.b)
    # The final temperatures are those of the margins of the centroids one step back ...
    torch.testing.assert_close(cur.gamma_pos, _side_std(m_prev, pos))
    torch.testing.assert_close(cur.gamma_neg, _side_std(-m_prev, neg))
    # ... not those of the final centroids.
    assert abs(cur.gamma_pos - _side_std(m_cur, pos)) > 1e-6
    # The final centroids are the gated means under the previous centroids; the gates use the
    # temperatures of the centroids two steps back, which is what the k-1 run reports.
    a_pos = (adv.clamp(min=0) * mask)[..., None]
    w = torch.sigmoid(m_prev / prev.gamma_pos)[..., None] * a_pos
    torch.testing.assert_close(cur.mu_pos, (w * v).sum((0, 1)) / w.sum())


def test_margin_equals_difference_of_squared_distances():
    h, logp, adv, mask = as64(*make_batch(5, 7, 9, seed=3))
    r = dk.delta_coefficients(h, logp, adv, mask, k=1, backend="torch")
    v = dk.token_sketch(h, logp, backend="torch")
    explicit = ((v - r.stats.mu_neg) ** 2).sum(-1) - ((v - r.stats.mu_pos) ** 2).sum(-1)
    torch.testing.assert_close(2 * (v @ r.stats.W + r.stats.b), explicit)
    torch.testing.assert_close(r.stats.pred, torch.sign(adv)[:, None] * explicit / 2 * mask)


def test_one_side_empty():
    h, logp, adv, mask = as64(*make_batch(4, 6, 5, seed=4, zero_adv_frac=0.0))
    adv = adv.abs() + 0.1  # no negative side
    r = dk.delta_coefficients(h, logp, adv, mask, backend="torch")
    assert torch.isfinite(r.coef).all()
    assert torch.equal(r.stats.mu_neg, torch.zeros_like(r.stats.mu_neg))
    assert r.stats.gamma_neg.item() == pytest.approx(math.sqrt(1e-8))
    assert r.coef[mask].mean().item() == pytest.approx(1.0)


def test_all_zero_advantages_give_exactly_one():
    h, logp, _, mask = as64(*make_batch(4, 6, 5, seed=5))
    for dtype in (torch.float32, F64):
        r = dk.delta_coefficients(h.to(dtype), logp.to(dtype), torch.zeros(4, dtype=dtype), mask, k=2, backend="torch")
        assert torch.equal(r.coef[mask], torch.ones_like(r.coef[mask]))
        assert torch.equal(r.coef[~mask], torch.zeros_like(r.coef[~mask]))


def test_fully_masked_gives_zeros():
    h, logp, adv, _ = as64(*make_batch(3, 4, 5, seed=6))
    r = dk.delta_coefficients(h, logp, adv, torch.zeros(3, 4, dtype=torch.bool), k=1, backend="torch")
    assert torch.equal(r.coef, torch.zeros_like(r.coef))
    assert torch.isfinite(r.stats.pred).all() and torch.isfinite(r.stats.gamma_pos)


def test_single_token():
    h = torch.randn(1, 4, dtype=F64)
    r = dk.delta_coefficients(h, torch.tensor([-0.7], dtype=F64), torch.tensor([1.3], dtype=F64),
                              torch.tensor([True]), k=1, backend="torch")
    torch.testing.assert_close(r.coef, torch.ones(1, dtype=F64))


def test_sequence_and_token_level_advantages_agree():
    h, logp, adv, mask = as64(*make_batch(5, 7, 6, seed=7))
    a = dk.delta_coefficients(h, logp, adv, mask, backend="torch")
    b = dk.delta_coefficients(h, logp, adv[:, None].expand(5, 7).contiguous(), mask, backend="torch")
    assert torch.equal(a.coef, b.coef)
    flat = dk.delta_coefficients(h.reshape(35, 6), logp.reshape(35), adv[:, None].expand(5, 7).reshape(35),
                                 mask.reshape(35), backend="torch")
    torch.testing.assert_close(flat.coef, a.coef.reshape(35), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("seq_level", [True, False])
def test_naive_equals_reference(k, seq_level):
    h, logp, adv, mask = as64(*make_batch(11, 9, 13, seed=20 + k, seq_level=seq_level))
    ref = dk.delta_coefficients(h, logp, adv, mask, k=k, backend="torch").coef
    torch.testing.assert_close(delta_coefficients_naive(h, logp, adv, mask, k=k, micro_batch=4), ref,
                               rtol=1e-12, atol=1e-12)


def test_sketch_preserves_inner_products_in_expectation():
    torch.manual_seed(0)
    v = torch.randn(2, 256, dtype=F64)
    ests = []
    for seed in range(200):
        r = dk.sketch_matrix(256, 64, seed, dtype=F64)
        z = v @ r
        ests.append((z[0] @ z[1]).item())
    exact = (v[0] @ v[1]).item()
    mean = sum(ests) / len(ests)
    assert abs(mean - exact) < 4 * (v[0].norm() * v[1].norm()).item() / math.sqrt(64 * 200)


def test_sketch_matrix_is_a_pure_function_of_seed_row_column():
    a = dk.sketch_matrix(40, 12, seed=7)
    b = dk.sketch_matrix(100, 30, seed=7)
    assert torch.equal(torch.sign(a), torch.sign(b[:40, :12]))  # signs do not depend on H or r
    assert torch.equal(a.abs(), torch.full_like(a, float(torch.tensor(12 ** -0.5, dtype=torch.float32))))
    assert not torch.equal(torch.sign(a), torch.sign(dk.sketch_matrix(40, 12, seed=8)))
    assert abs(torch.sign(b).mean().item()) < 0.05  # balanced signs


def test_sketch_matrix_known_values():
    # Spot values of the hash, computed by hand from the spec in sketch_matrix.py with Python ints,
    # independent of the torch implementation.
    def mix(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16; x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15; x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    for seed, i, j in [(0, 0, 0), (1, 5, 3), (2**32 - 1, 99, 29), (12345, 63, 17)]:
        h = mix(mix(i ^ mix(seed)) ^ mix(j + 0x9E3779B9))
        expected = 1.0 if h < 2**31 else -1.0
        assert torch.sign(dk.sketch_matrix(100, 30, seed)[i, j]).item() == expected


def test_sketched_coefficients_use_z():
    h, logp, adv, mask = as64(*make_batch(6, 5, 32, seed=8))
    z = dk.token_sketch(h, logp, sketch_dim=8, seed=3, backend="torch")
    torch.testing.assert_close(z, dk.token_sketch(h, logp, backend="torch") @ dk.sketch_matrix(32, 8, 3, dtype=F64))
    a = dk.delta_coefficients(h, logp, adv, mask, sketch_dim=8, seed=3, backend="torch")
    b = dk.delta_coefficients(None, logp, adv, mask, vectors=z, backend="torch")
    torch.testing.assert_close(a.coef, b.coef, rtol=1e-13, atol=1e-13)
