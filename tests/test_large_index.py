"""N * H past 2**31 elements: 64-bit offsets in the CPU kernels, against a chunked reference."""
import pytest
import torch

import delta_kernels as dk
from delta_kernels._formulas import centroids_from_sums, discriminator, final_coefficients, side_masks, side_std
from delta_kernels._checks import DeltaConfig

H = 4096
N = 2**31 // H + 3  # N * H = 2**31 + 3 * 4096
CHUNK = 65536


def identity(t):
    return t


def big_batch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.empty(N, H, dtype=torch.bfloat16)
    for s in range(0, N, CHUNK):
        e = min(N, s + CHUNK)
        hidden[s:e] = torch.randn(e - s, H, generator=g).to(torch.bfloat16)
    logp = -torch.rand(N, generator=g) * 3
    adv = torch.randn(N // 64 + 1, generator=g).repeat_interleave(64)[:N]
    mask = torch.rand(N, generator=g) > 0.1
    return hidden, logp, adv, mask


def chunked_reference_k0(hidden, logp, adv, mask):
    """Steps of the reference for k = 0 in float64, streaming over row chunks."""
    f64 = torch.float64
    pos, neg, valid, a_pos, a_neg = side_masks(adv, mask, f64)
    sums = torch.zeros(2, H, dtype=f64)
    for s in range(0, N, CHUNK):
        v = -torch.expm1(logp[s:s + CHUNK].double())[:, None] * hidden[s:s + CHUNK].double()
        sums += torch.stack([a_pos[s:s + CHUNK] @ v, a_neg[s:s + CHUNK] @ v])
    mu = centroids_from_sums(sums, torch.stack([a_pos.sum(), a_neg.sum()]), 1e-8, identity)
    w, c = discriminator(mu)
    m = torch.empty(N, dtype=f64)
    for s in range(0, N, CHUNK):
        v = -torch.expm1(logp[s:s + CHUNK].double())[:, None] * hidden[s:s + CHUNK].double()
        m[s:s + CHUNK] = 2 * ((v - c) @ w)
    gamma = side_std(m, pos, neg, 1e-8, identity)
    return final_coefficients(m, gamma, pos, neg, valid, DeltaConfig(k=0), identity)[0]


@pytest.mark.slow
@pytest.mark.skipif("cpp" not in dk.available_backends(), reason="cpp module not built")
def test_coefficients_past_2_to_31_elements():
    hidden, logp, adv, mask = big_batch()
    assert hidden.numel() > 2**31
    got = dk.delta_coefficients(hidden, logp, adv, mask, k=0, backend="cpp", check_values=False).coef
    ref = chunked_reference_k0(hidden, logp, adv, mask)
    rel = ((got.double() - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel
    tail = slice(N - 1000, N)  # rows whose elements sit past 2**31
    tail_rel = ((got[tail].double() - ref[tail]).norm() / ref[tail].norm()).item()
    assert tail_rel < 2e-2, tail_rel
