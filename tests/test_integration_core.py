"""The framework-free integration core: OpenRLHF-style alignment of padded and packed body
outputs, one-call and accumulated folds against delta_coefficients, metrics over split ranks."""
import pytest
import torch

import delta_kernels as dk
from delta_kernels.integrations import core


def rows(seed=0):
    """Right-padded rows [B, S] of lengths 5, 3, 6 and a hidden [B, S, H] that is 0 at padding."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(6)[None] < torch.tensor([5, 3, 6])[:, None]).long()
    return mask, torch.randn(3, 6, 4, generator=g) * mask[..., None]


def test_action_hidden_states_padded_and_packed_agree():
    mask, h = rows()
    padded = core.action_hidden_states(h, mask)
    packed = core.action_hidden_states(h[mask.bool()][None], mask)  # [1, nnz, H], as unpad_input packs
    assert padded.shape == (3, 5, 4)
    torch.testing.assert_close(padded, h[:, :-1])
    torch.testing.assert_close(packed, padded)
    pad_tail = torch.cat([h[mask.bool()], torch.randn(2, 4)])[None]  # extra padding after the nnz tokens
    torch.testing.assert_close(core.action_hidden_states(pad_tail, mask), padded)


def test_action_hidden_states_refuses_bad_shapes():
    mask, h = rows()
    with pytest.raises(ValueError, match="hidden: expected"):
        core.action_hidden_states(h[0], mask)
    with pytest.raises(ValueError, match="attention_mask: expected"):
        core.action_hidden_states(h, mask[0])
    with pytest.raises(ValueError, match="hidden: shape .* nor packed"):
        core.action_hidden_states(h[mask.bool()][None, :10], mask)


def test_fold_and_fold_accumulated_equal_delta_coefficients():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 5, 8, generator=g, dtype=torch.float64)
    logp = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=g) > 0.2
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    spec = core.DeltaSpec(k=2, backend="torch")
    ref = dk.delta_coefficients(h, logp * mask, adv, mask, k=2, backend="torch")
    one = core.fold(spec, adv, logp, mask, hidden=h)
    torch.testing.assert_close(one.advantages, ref.weighted_advantages)
    acc = spec.accumulator()
    for i in (0, 2):
        acc.add(h[i:i + 2], (logp * mask)[i:i + 2], mask[i:i + 2])
    acc_fold = core.fold_accumulated(acc, adv, mask)
    torch.testing.assert_close(acc_fold.advantages, ref.weighted_advantages)
    coef = ref.coef[mask]
    assert one.metrics["delta/coef_std"] == pytest.approx(float(coef.std(unbiased=False)), rel=1e-5)
    assert one.metrics["delta/coef_min"] == pytest.approx(float(coef.min()))
    assert one.metrics == pytest.approx(acc_fold.metrics)
    assert list(one.metrics) == [f"delta/{n}" for n in core.METRIC_NAMES]


def test_metrics_over_split_ranks_equal_the_whole():
    g = torch.Generator().manual_seed(2)
    h, logp = torch.randn(6, 4, 8, generator=g), -torch.rand(6, 4, generator=g)
    mask, adv = torch.rand(6, 4, generator=g) > 0.3, torch.randn(6, generator=g)
    whole = core.fold(core.DeltaSpec(backend="torch"), adv, logp, mask, hidden=h)
    halves = [(whole.result.coef[:3], mask[:3]), (whole.result.coef[3:], mask[3:])]
    parts = []
    for coef, m in halves:  # each "rank" sees its rows; gather concatenates the partial sums
        part = dk.coefficients.DeltaResult(coef=coef, weighted_advantages=coef, stats=whole.result.stats)
        parts.append(part)
    sent = []
    core.delta_metrics(parts[1], halves[1][1], gather=lambda t: sent.append(t) or t)  # rank 1's row
    rank0 = core.delta_metrics(parts[0], halves[0][1], gather=lambda t: torch.cat([t, sent[0]]))
    assert rank0 == pytest.approx(whole.metrics, rel=1e-5)
