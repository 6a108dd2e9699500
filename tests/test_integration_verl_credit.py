"""The verl plugin's credit policy losses on the same batch as an independent float64 computation:
"delta_fipo" against the FIPO authors' future_kl loss (tests/test_fipo.py), four modes; "delta_entropy"
through verl's own ppo_loss (the actor's entropies) against TRL's high-entropy mask on the surrogate."""
from __future__ import annotations

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
ActorConfig = pytest.importorskip("verl.workers.config.actor").ActorConfig
verl_credit = pytest.importorskip("delta_kernels.integrations.verl").verl_credit

from test_fipo import CLIP_C, CLIP_HIGH, CLIP_LOW, authors_loss, fipo_batch  # noqa: E402
from test_integration_verl import cpu_device, process_group  # noqa: E402,F401  (autouse fixtures: verl's engine)


def actor_config(**kw):
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, use_torch_compile=False,
                       clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C, **kw)


def test_registered_as_a_verl_policy_loss():
    assert core_algos.get_policy_loss_fn("delta_fipo") is verl_credit.compute_policy_loss_delta_fipo


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_policy_loss_equals_the_authors_future_kl_loss(mode):
    logp, old, adv, mask = fipo_batch(5, 40, seed=4, dtype=torch.float64, pad_nan=False)
    adv_t = adv[:, None].expand_as(logp).contiguous()
    ref_lp, lp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ref = authors_loss(ref_lp, old, adv_t, mask, mode)
    loss, metrics = core_algos.get_policy_loss_fn("delta_fipo")(old, lp, adv_t, mask.double(), mode, actor_config())
    (ref + loss).backward()
    assert abs(float(loss) - float(ref)) <= 1e-7 * abs(float(ref))
    assert float((lp.grad - ref_lp.grad).norm()) <= 1e-7 * float(ref_lp.grad.norm())
    assert metrics["actor/fipo/rows_dropped"] >= 1 and "actor/pg_clipfrac" in metrics


def test_options_under_the_authors_keys():
    assert verl_credit.options_from_config(verl_credit.FipoOptions, None) == verl_credit.FipoOptions()
    opts = verl_credit.options_from_config(verl_credit.FipoOptions, {"decay_rate": 8, "future_kl_clip_ratio": 0.0, "safety_thresh": None})
    assert opts.decay_rate == 8.0 and opts.future_kl_clip_ratio == 0.0 and opts.safety_thresh == 10.0
    with pytest.raises(ValueError, match="^decay_rate: must be > 0"):
        verl_credit.options_from_config(verl_credit.FipoOptions, {"decay_rate": 0})


# ---------------------------------------------------------------- the entropy method (delta_entropy)
def reference_entropy_loss(logp, old, adv, mask, entropy, top_quantile, mode="token-mean"):
    """Independent float64: TRL 1.16's get_high_entropy_mask (torch.quantile over the valid
    entropies) on the dual-clip surrogate, verl 0.9.1's agg_loss."""
    thr = torch.quantile(entropy.detach()[mask].float(), 1 - top_quantile)
    keep = (entropy.detach().float() >= thr) & mask
    ratio = torch.exp((logp - old).clamp(-20, 20))
    clip1 = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
    losses = torch.where(adv < 0, torch.minimum(clip1, -adv * CLIP_C), clip1)
    return core_algos.agg_loss(torch.where(keep, losses, 0.0), mask.double(), mode), keep


def test_entropy_policy_loss_through_verls_actor_loss():
    """loss_mode delta_entropy in verl's own ppo_loss (patched: the actor's entropies reach the
    policy loss), called as verl's engine calls it on a jagged micro-batch (log-probs and
    entropies of verl's FSDP engine forward, calculate_entropy on): value and gradient in the
    log-probs equal the independent float64 computation on the same batch."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils import losses
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding
    from integration_models import tiny_model
    from verl_standins import B, R, cpu_engine, padded_batch
    from delta_kernels.integrations import verl as dv
    assert dv.INSTALLED["verl.workers.utils.losses.ppo_loss"] in ("patched", "already patched")
    td = padded_batch(3)
    data = left_right_2_no_padding(td.clone())
    tu.assign_non_tensor(data, use_remove_padding=True, use_dynamic_bsz=True, max_token_len_per_gpu=256,
                         temperature=1.0, calculate_entropy=True)
    with torch.no_grad():  # verl's own engine forward: jagged log-probs and entropies
        out = cpu_engine(tiny_model()).forward_backward_batch(data, None, forward_only=True)["model_output"]
    assert out["entropy"].is_nested
    mask = td["response_mask"].bool()
    g = torch.Generator().manual_seed(8)
    logp_pad = no_padding_2_padding(out["log_probs"], td).double()
    old = torch.where(mask, logp_pad + 0.3 * torch.randn(B, R, generator=g, dtype=torch.float64), 0.0)
    adv = torch.randn(B, generator=g, dtype=torch.float64)[:, None].expand(B, R) * mask
    values = out["log_probs"].values().double().clone().requires_grad_()
    jagged = torch.nested.nested_tensor_from_jagged(values, out["log_probs"].offsets())
    data["old_log_probs"], data["advantages"] = old, adv.contiguous()
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=B)
    cfg = hydra_actor_config(loss_mode="delta_entropy", top_quantile=0.3)
    loss, metrics = losses.ppo_loss(cfg, {"log_probs": jagged, "entropy": out["entropy"]}, data)
    grad, = torch.autograd.grad(loss, values)
    ref_lp = no_padding_2_padding(jagged.detach(), td).double().requires_grad_()
    entropy = no_padding_2_padding(out["entropy"], td)
    ref, keep = reference_entropy_loss(ref_lp, old, adv, mask, entropy, 0.3)
    ref_grad, = torch.autograd.grad(ref, ref_lp)
    assert 0 < int(keep.sum()) < int(mask.sum())
    assert abs(float(loss.detach()) - float(ref)) <= 1e-9 * abs(float(ref))
    assert float(grad.abs().sum()) > 0
    torch.testing.assert_close(no_padding_2_padding(torch.nested.nested_tensor_from_jagged(
        grad, out["log_probs"].offsets()), td)[mask], ref_grad[mask], rtol=1e-9, atol=1e-12)
    assert {"actor/entropy/threshold", "actor/entropy/kept_frac", "actor/pg_loss"} <= set(metrics)


def hydra_actor_config(**policy_loss):
    """The actor config as verl's workers build it from Hydra (omega_conf_to_dataclass on a node
    with _target_), policy_loss._target_ set to CreditPolicyLossConfig so that it takes the options."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass
    return omega_conf_to_dataclass(OmegaConf.create(dict(
        _target_="verl.workers.config.ActorConfig", strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
        use_torch_compile=False, clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C,
        calculate_entropy=True, policy_loss=dict(
            _target_="delta_kernels.integrations.verl_credit.CreditPolicyLossConfig", **policy_loss))))


def test_options_through_verls_structured_config():
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config.actor import PolicyLossConfig
    with pytest.raises(ConfigKeyError):  # why CreditPolicyLossConfig: verl's own refuses the keys
        omega_conf_to_dataclass(OmegaConf.create(dict(top_quantile=0.5)), PolicyLossConfig)
    cfg = hydra_actor_config(loss_mode="delta_fipo_entropy", decay_rate=8, top_quantile=0.5)
    assert isinstance(cfg.policy_loss, verl_credit.CreditPolicyLossConfig)
    assert verl_credit.options_from_config(verl_credit.FipoOptions, cfg.policy_loss) == verl_credit.FipoOptions(
        decay_rate=8.0)
    assert verl_credit.options_from_config(verl_credit.EntropyOptions, cfg.policy_loss).top_quantile == 0.5
    defaults = hydra_actor_config(loss_mode="delta_fipo").policy_loss
    assert verl_credit.options_from_config(verl_credit.FipoOptions, defaults) == verl_credit.FipoOptions()


def test_entropy_policy_loss_without_entropies_is_refused():
    logp, old, adv, mask = fipo_batch(3, 8, seed=2, dtype=torch.float64, pad_nan=False)
    with pytest.raises(ValueError, match="^actor_rollout_ref.actor.calculate_entropy"):
        core_algos.get_policy_loss_fn("delta_entropy")(old, logp, adv[:, None].expand_as(logp), mask, "token-mean",
                                                       actor_config())
