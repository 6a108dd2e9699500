"""Property tests (hypothesis): random shapes, dtypes, masks and advantage patterns.

For every backend of the registry (tests/backend_cases.py; fewer examples under the Triton
interpreter): coefficients are finite, non-negative, zero where masked, mean 1 over valid
tokens, within [lam_min, lam_max] x the normalisation factor, and equal to the float64
reference; the sketch and the surrogate agree with the reference too.
"""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import delta_kernels as dk
from delta_kernels.aggregation import AGG_MODES
from helpers import TOL, assert_rel

FAST = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

ADV_PATTERNS = ("random", "ties", "zeros", "one_side", "sparse")


@st.composite
def batches(draw):
    n_seq = draw(st.integers(1, 6))
    seq_len = draw(st.integers(1, 9))
    hidden = draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_seq, seq_len, hidden, generator=g) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    logp = -torch.rand(n_seq, seq_len, generator=g) * 4
    pattern = draw(st.sampled_from(ADV_PATTERNS))
    if pattern == "random":
        adv = torch.randn(n_seq, seq_len, generator=g)
    elif pattern == "ties":
        adv = torch.tensor([-1.0, 0.0, 1.0])[torch.randint(0, 3, (n_seq,), generator=g)][:, None].expand(
            n_seq, seq_len).contiguous()
    elif pattern == "zeros":
        adv = torch.zeros(n_seq, seq_len)
    elif pattern == "one_side":
        adv = torch.rand(n_seq, seq_len, generator=g) + 0.1
    else:
        adv = torch.randn(n_seq, seq_len, generator=g) * (torch.rand(n_seq, seq_len, generator=g) < 0.2)
    mask_p = draw(st.sampled_from([0.0, 0.3, 1.0]))
    mask = torch.rand(n_seq, seq_len, generator=g) >= mask_p
    k = draw(st.integers(0, 3))
    lam_min = draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
    lam_max = lam_min + draw(st.sampled_from([0.0, 0.4, 1.0]) if lam_min > 0 else st.sampled_from([0.4, 1.0]))
    sketch_dim = draw(st.sampled_from([None, None, 1, 5, 16]))
    return dict(h=h.to(dtype), logp=logp.to(dtype), adv=adv.to(dtype), mask=mask, k=k, lam_min=lam_min,
                lam_max=lam_max, sketch_dim=sketch_dim, seed=seed % 2**32)


def examples(backend):
    """How many examples a backend runs: fewer under the interpreter."""
    return FEW if backend.interpreted else FAST


def on_device(b, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


def reference(b):
    return dk.delta_coefficients(b["h"].double(), b["logp"].double(), b["adv"].double(), b["mask"], k=b["k"],
                                 lam_min=b["lam_min"], lam_max=b["lam_max"], sketch_dim=b["sketch_dim"],
                                 seed=b["seed"], backend="torch")


def check_coefficients(b, backend):
    res = dk.delta_coefficients(b["h"], b["logp"], b["adv"], b["mask"], k=b["k"], lam_min=b["lam_min"],
                                lam_max=b["lam_max"], sketch_dim=b["sketch_dim"], seed=b["seed"], backend=backend)
    coef, mask = res.coef, b["mask"]
    assert torch.isfinite(coef).all()
    assert (coef >= 0).all()
    assert (coef[~mask] == 0).all()
    if mask.any() and (b["lam_min"] > 0 or (b["adv"][mask] != 0).any()):
        assert abs(coef[mask].double().mean().item() - 1.0) < 1e-5
        scale = res.stats.scale.item()
        assert (coef[mask] >= b["lam_min"] * scale * (1 - 1e-5) - 1e-6).all()
        assert (coef[mask] <= b["lam_max"] * scale * (1 + 1e-5) + 1e-6).all()
    ref = reference(b)
    # docs/design.md's tolerance for the input dtype (backends may keep v in bf16: v rounds there).
    assert_rel(coef, ref.coef, TOL[b["h"].dtype], f"{backend} coef")
    return res


def test_coefficient_properties(backend):
    @given(batches())
    def run(b):
        check_coefficients(on_device(b, backend.device), backend)
    examples(backend)(run)()


def test_sketch_properties(backend):
    @given(batches())
    def run(b):
        b = on_device(b, backend.device)
        z = dk.token_sketch(b["h"], b["logp"], sketch_dim=b["sketch_dim"], seed=b["seed"], backend=backend)
        ref = dk.token_sketch(b["h"].double(), b["logp"].double(), sketch_dim=b["sketch_dim"], seed=b["seed"],
                              backend="torch")
        assert z.dtype == b["h"].dtype
        assert_rel(z, ref, TOL[b["h"].dtype], f"{backend} sketch")
    examples(backend)(run)()


def test_surrogate_properties(backend):
    aggs = st.sampled_from(AGG_MODES)

    @given(batches(), aggs, st.sampled_from([0.0, 0.05, 1.0]))
    def run(b, agg, noise):
        b = on_device(b, backend.device)
        g = torch.Generator().manual_seed(b["seed"])
        old = b["logp"]
        new = (old.float() + noise * torch.randn(old.shape, generator=g).to(old.device)).clamp(max=0).to(old.dtype)
        coef = (torch.rand(old.shape, generator=g) + 0.5).to(old.device)
        lp = new.clone().requires_grad_(True)
        loss, metrics = dk.clipped_surrogate_loss(lp, old, b["adv"], b["mask"], coef=coef, agg=agg, backend=backend)
        loss.backward()
        lp64 = new.double().requires_grad_(True)
        ref, ref_metrics = dk.clipped_surrogate_loss(lp64, old.double(), b["adv"].double(), b["mask"],
                                                     coef=coef.double(), agg=agg, backend="torch")
        ref.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
        tol = TOL[torch.float32] * 10
        assert_rel(loss.reshape(1), ref.reshape(1), tol, f"{backend} {agg} loss")
        assert_rel(lp.grad, lp64.grad, tol if new.dtype == torch.float32 else TOL[new.dtype], f"{backend} grad")
        for name in ("clip_frac", "clip_frac_lower", "ppo_kl"):
            assert_rel(metrics[name].reshape(1), ref_metrics[name].reshape(1), tol, name)
    examples(backend)(run)()
