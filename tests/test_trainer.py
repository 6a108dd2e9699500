"""The reference trainer: outputs of a run, zero extra forwards, the logit-free old-log-prob pass
and update loss against the float64 logits path (tied and untied heads, temperature),
determinism, GRPO advantages, coefficients against the float64 reference, argument checks."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from delta_kernels.trainer.__main__ import parse_config
from delta_kernels.trainer.advantages import grpo_advantages
from delta_kernels.trainer.config import TrainerConfig
from delta_kernels.trainer.loop import deterministic_view, run
from delta_kernels.trainer.model import ModelSize, build_default_model, load_pretrained
from delta_kernels.trainer.report import read_metrics
from delta_kernels.trainer.rollout import sample_responses
from delta_kernels.trainer.step import (CreditConfig, ForwardCounter, UpdateConfig, credit_coefficients,
                                        old_logprob_micro_batches, old_logprob_pass, policy_loss)
from delta_kernels.trainer.tokenizer import CharTokenizer
from helpers import TOL, as64, assert_rel

import delta_kernels


def tiny_config(tmp_path, name, **kw) -> TrainerConfig:
    base = dict(steps=3, prompts_per_step=4, group_size=4, minibatches=2, hidden_size=32, num_layers=1,
                num_heads=2, sft_max_steps=25, heldout_size=16, html_samples=6, progress=False, threads=1,
                out=str(tmp_path / name), lr=1e-3, warmup_steps=1)
    base.update(kw)
    return TrainerConfig(**base)


def tiny_model(seed=0, hidden=32):
    tok = CharTokenizer()
    model, _ = build_default_model(tok.vocab_size, ModelSize(hidden_size=hidden, num_layers=2, num_heads=2,
                                                             num_kv_heads=1, intermediate_size=48),
                                   seed, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    return model.eval(), tok


def random_prompts(tok, n, seed):
    rng = random.Random(seed)
    return [tok.encode(f"{rng.randrange(0, 10 ** rng.randint(1, 3))}+{rng.randrange(0, 100)}=") for _ in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of one seed with --credit delta, one with --credit none."""
    tmp = tmp_path_factory.mktemp("trainer")
    return {name: run(tiny_config(tmp, name, credit=credit, seed=seed))
            for name, credit, seed in [("delta_a", "delta", 3), ("delta_b", "delta", 3), ("none", "none", 3)]}


def test_run_writes_metrics_png_html(runs):
    s = runs["delta_a"]
    rows = read_metrics(os.path.join(s["out"], "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        for key in ("reward", "accuracy", "entropy", "loss", "clip_frac", "ppo_kl", "time_rollout",
                    "time_old_logprob", "time_coefficients", "time_update"):
            assert key in r and r[key] == r[key], key
        assert 0.0 <= r["accuracy"] <= 1.0 and r["entropy"] > 0
    with open(os.path.join(s["out"], "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    page = open(os.path.join(s["out"], "responses.html")).read()
    assert 'class="tok"' in page and "coef " in page
    summary = json.load(open(os.path.join(s["out"], "summary.json")))
    assert 0.0 <= summary["accuracy_before_rl"] <= 1.0 and 0.0 <= summary["accuracy_after_rl"] <= 1.0
    assert set(summary["time_split"]) == {"rollout", "old_logprob", "coefficients", "update"}


def test_delta_costs_no_extra_forward(runs):
    """Per step: one old-log-prob forward, none for the coefficients, one per mini-batch, in both modes."""
    for name in ("delta_a", "none"):
        rows = read_metrics(os.path.join(runs[name]["out"], "metrics.jsonl"))
        for r in rows:
            assert r["forwards_old_logprob"] == 1 and r["forwards_coefficients"] == 0
            assert r["forwards_update"] == 2
    first_delta = read_metrics(os.path.join(runs["delta_a"]["out"], "metrics.jsonl"))[0]
    first_none = read_metrics(os.path.join(runs["none"]["out"], "metrics.jsonl"))[0]
    assert first_delta["forwards_total"] == first_none["forwards_total"]  # same rollouts at step 0


def test_micro_batched_run_matches_the_one_pass_run(runs, tmp_path):
    """--micro-batch 4: one old-log-prob forward per micro-batch, and the first step (same
    rollouts, same model) gets the coefficients of the one-pass run."""
    mb = run(tiny_config(tmp_path, "micro", credit="delta", seed=3, steps=1, micro_batch=4))
    row = read_metrics(os.path.join(mb["out"], "metrics.jsonl"))[0]
    ref = read_metrics(os.path.join(runs["delta_a"]["out"], "metrics.jsonl"))[0]
    assert row["forwards_old_logprob"] == 4 and row["reward"] == ref["reward"]
    for key in ("delta_gamma_pos", "delta_gamma_neg", "coef_min", "coef_max", "coef_std"):
        assert row[key] == pytest.approx(ref[key], rel=1e-4), key


def test_same_seed_same_metrics(runs, tmp_path):
    a = read_metrics(os.path.join(runs["delta_a"]["out"], "metrics.jsonl"))
    b = read_metrics(os.path.join(runs["delta_b"]["out"], "metrics.jsonl"))
    assert deterministic_view(a) == deterministic_view(b)
    other = run(tiny_config(tmp_path, "seed4", seed=4, steps=1, sft_max_steps=0))
    c = read_metrics(os.path.join(other["out"], "metrics.jsonl"))
    assert deterministic_view(c)[0] != deterministic_view(a)[0]


def test_credit_none_gives_unit_coefficients_and_delta_does_not(runs):
    page_none = open(os.path.join(runs["none"]["out"], "responses.html")).read()
    assert "Range here\n[1.000, 1.000]" in page_none
    rows = read_metrics(os.path.join(runs["none"]["out"], "metrics.jsonl"))
    assert all(r["coef_min"] == 1.0 and r["coef_max"] == 1.0 for r in rows)


def _full_forward64(model, roll):
    """The unfused oracle: the full model's forward (float32, with logits), the last hidden state
    there, and the logits recomputed from it in float64. Returns (logits64, hidden64) of the
    columns predicting the response."""
    with torch.no_grad():
        full = model(input_ids=roll.input_ids, attention_mask=roll.attention_mask, position_ids=roll.position_ids,
                     output_hidden_states=True, use_cache=False)
    p, t = roll.prompt_len, roll.response_ids.shape[1]
    h64 = full.hidden_states[-1][:, p - 1:p + t - 1].double()
    head = model.get_output_embeddings()
    logits64 = h64 @ head.weight.double().T
    torch.testing.assert_close(logits64.float(), full.logits[:, p - 1:p + t - 1], rtol=1e-5, atol=1e-5)
    return logits64, h64


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_old_logprob_pass_matches_full_forward(temperature):
    """The body-only pass + fused LM-head kernel gives the hidden states entering the head, and the
    log-probs, entropies, token vectors and side sums of the full model's logits / temperature."""
    model, tok = tiny_model(seed=1)
    g = torch.Generator().manual_seed(5)
    roll = sample_responses(model, random_prompts(tok, 9, seed=2), max_new_tokens=5, eos_id=tok.eos_token_id,
                            pad_id=tok.pad_token_id, generator=g)
    assert roll.prompt_len > min(int(m.sum()) for m in roll.attention_mask[:, :roll.prompt_len])  # left padding used
    adv = torch.randn(9, generator=g)
    with ForwardCounter(model) as counter:
        old = old_logprob_pass(model, roll, temperature, adv, CreditConfig())
    assert counter.count == 1
    p, t = roll.prompt_len, roll.response_ids.shape[1]
    with torch.no_grad():
        full = model(input_ids=roll.input_ids, attention_mask=roll.attention_mask, position_ids=roll.position_ids,
                     output_hidden_states=True, use_cache=False)
    valid = roll.response_mask
    torch.testing.assert_close(old.hidden[valid], full.hidden_states[-1][:, p - 1:p + t - 1][valid], rtol=0, atol=0)
    logits64, h64 = _full_forward64(model, roll)
    logprobs = torch.log_softmax(logits64 / temperature, -1)
    ref_logp = logprobs.gather(-1, roll.response_ids[..., None])[..., 0]
    assert_rel(old.logp[valid], ref_logp[valid], TOL[torch.float32], "old logp")
    ref_ent = -(logprobs.exp() * logprobs).sum(-1)
    assert_rel(old.entropy[valid], ref_ent[valid], TOL[torch.float32], "entropy")
    ref_v = (1 - ref_logp.exp())[..., None] * h64
    assert_rel(old.vectors[valid], ref_v[valid], TOL[torch.float32], "token vectors")
    a = adv.double()[:, None] * valid
    ref_sums = torch.stack([(a.clamp(min=0)[..., None] * ref_v).sum((0, 1)),
                            ((-a).clamp(min=0)[..., None] * ref_v).sum((0, 1))])
    assert_rel(old.side_sums, ref_sums, TOL[torch.float32], "side sums")


def _untied(model):
    """The same model with an LM head that no longer shares the input embedding's weight."""
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_policy_loss_gradients_match_logits_reference(tied):
    """The fused update loss (hidden states + LM head, no logits) gives the loss, metrics and
    parameter gradients of the logits path: the full model's forward (float32 logits), then
    log_softmax(logits / T) and the reference clipped surrogate with coefficients in float64."""
    model, tok = tiny_model(seed=6)
    if not tied:
        model = _untied(model)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    g = torch.Generator().manual_seed(7)
    roll = sample_responses(model, random_prompts(tok, 8, seed=8), max_new_tokens=5, eos_id=tok.eos_token_id,
                            pad_id=tok.pad_token_id, generator=g)
    cfg = UpdateConfig(temperature=0.8)
    old = old_logprob_pass(model, roll, cfg.temperature)
    old_logp = (old.logp + 0.3 * torch.randn(old.logp.shape, generator=g)).clamp(max=0)  # some ratios clip
    adv = torch.randn(8, generator=g)
    coef = (0.8 + 0.4 * torch.rand(old.logp.shape, generator=g)) * roll.response_mask
    model.zero_grad()
    loss, metrics = policy_loss(model, roll, old_logp, adv, coef, cfg)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    logits = model(input_ids=roll.input_ids, attention_mask=roll.attention_mask, position_ids=roll.position_ids,
                   use_cache=False).logits  # float32 forward, then the logits path in float64
    p, t = roll.prompt_len, roll.response_ids.shape[1]
    logp = torch.log_softmax(logits[:, p - 1:p + t - 1].double() / cfg.temperature, -1).gather(
        -1, roll.response_ids[..., None])[..., 0]
    ref_loss, ref_metrics = delta_kernels.clipped_surrogate_loss(logp, old_logp.double(), adv.double(),
                                                                 roll.response_mask, coef=coef.double(),
                                                                 backend="torch")
    ref_loss.backward()
    assert 0.0 < float(ref_metrics["clip_frac"]) < 1.0
    assert_rel(loss, ref_loss, TOL[torch.float32], "loss")
    for k in ("clip_frac", "ppo_kl"):
        assert_rel(metrics[k], ref_metrics[k], TOL[torch.float32], k)
    for n, param in model.named_parameters():
        assert float(grads[n].abs().max()) > 0, n
        assert_rel(grads[n], param.grad, TOL[torch.float32], f"grad {n}")


def test_rollout_masks_after_eos():
    model, tok = tiny_model(seed=2)
    g = torch.Generator().manual_seed(0)
    roll = sample_responses(model, random_prompts(tok, 16, seed=3), max_new_tokens=6, eos_id=tok.eos_token_id,
                            pad_id=tok.pad_token_id, generator=g)
    for ids, mask in zip(roll.response_ids.tolist(), roll.response_mask.tolist()):
        n = sum(mask)
        assert mask == [True] * n + [False] * (len(mask) - n)
        assert all(i == tok.pad_token_id for i in ids[n:])
        assert tok.eos_token_id not in ids[:max(n - 1, 0)]
        if n < len(mask):
            assert ids[n - 1] == tok.eos_token_id


def sampled_rollout(model_seed: int, hidden: int, sample_seed: int, prompt_seed: int, rewards):
    """A tiny model, a rollout of 12 sampled responses (up to 5 tokens) and the GRPO advantages of
    ``rewards`` (12, groups of 4): (model, rollout, advantages [12])."""
    model, tok = tiny_model(seed=model_seed, hidden=hidden)
    g = torch.Generator().manual_seed(sample_seed)
    roll = sample_responses(model, random_prompts(tok, 12, seed=prompt_seed), max_new_tokens=5,
                            eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generator=g)
    return model, roll, grpo_advantages(torch.tensor(rewards, dtype=torch.float32), group_size=4)


def test_delta_coefficients_of_trainer_match_float64_reference():
    model, roll, adv = sampled_rollout(3, 48, 1, 4, [1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1])
    for sketch_dim in (None, 16):
        credit = CreditConfig(k=2, sketch_dim=sketch_dim)
        old = old_logprob_pass(model, roll, 1.0, adv, credit)
        assert old.vectors.shape[-1] == (sketch_dim or 48) and old.side_sums.shape == (2, sketch_dim or 48)
        coef, _ = credit_coefficients(old, adv, roll.response_mask, credit)
        h, lp, a = as64(old.hidden, old.logp, adv)
        ref = delta_kernels.delta_coefficients(h, lp, a, roll.response_mask, k=2, sketch_dim=sketch_dim,
                                               backend="torch").coef
        assert_rel(coef, ref, TOL[torch.float32], f"coef sketch_dim={sketch_dim}")
        assert float(coef[roll.response_mask].mean()) == pytest.approx(1.0, abs=1e-5)
    none, stats = credit_coefficients(old, adv, roll.response_mask, CreditConfig(credit="none"))
    assert stats is None and torch.equal(none, roll.response_mask.float())


@pytest.mark.parametrize("sketch_dim", [None, 16])
def test_micro_batched_old_logprob_pass_gives_the_same_coefficients(sketch_dim):
    """--micro-batch: the old-log-prob pass in micro-batches with a DeltaAccumulator (advantages at
    finalize) gives the coefficients of the one-pass run."""
    model, roll, adv = sampled_rollout(5, 40, 2, 6, [1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0])
    one_pass = CreditConfig(k=2, sketch_dim=sketch_dim)
    old = old_logprob_pass(model, roll, 1.0, adv, one_pass)
    coef, stats = credit_coefficients(old, adv, roll.response_mask, one_pass)
    for micro_batch in (1, 5, 12):
        credit = CreditConfig(k=2, sketch_dim=sketch_dim, micro_batch=micro_batch)
        with ForwardCounter(model) as counter:
            mb_old = old_logprob_micro_batches(model, roll, 1.0, credit)
        assert counter.count == -(-12 // micro_batch) and mb_old.vectors is None
        assert_rel(mb_old.logp, old.logp, TOL[torch.float32], "logp")
        mb_coef, mb_stats = credit_coefficients(mb_old, adv, roll.response_mask, credit)
        assert_rel(mb_coef, coef, TOL[torch.float32], f"coef micro_batch={micro_batch}")
        assert_rel(mb_stats.pred, stats.pred, TOL[torch.float32], "pred")
        assert_rel(mb_stats.gamma_pos, stats.gamma_pos, TOL[torch.float32], "gamma_pos")


def test_grpo_advantages():
    g = torch.Generator().manual_seed(0)
    r = (torch.rand(24, generator=g) > 0.5).float()
    r[8:12] = 1.0  # one group all correct
    adv = grpo_advantages(r, group_size=4).view(6, 4)
    rg = r.view(6, 4).double()
    ref = (rg - rg.mean(1, keepdim=True)) / (rg.std(1, keepdim=True) + 1e-6)
    ref[(rg == rg[:, :1]).all(1)] = 0.0
    assert_rel(adv, ref, 1e-6, "advantages")
    assert torch.equal(adv[2], torch.zeros(4))
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(torch.ones(7), group_size=4)


@pytest.mark.parametrize("argv, message", [
    (["--credit", "shapley"], "unknown credit method 'shapley'"),
    (["--credit", "entropy", "--fipo-decay-rate", "8"], "options given for ['fipo']"),
    (["--credit", "fipo", "--fipo-decay-rate", "0"], "decay_rate: must be > 0"),
    (["--credit", "entropy", "--entropy-top-quantile", "1.5"], "top_quantile: must be in (0, 1]"),
    (["--k", "-1"], "--k: refinement steps must be >= 0"),
    (["--model", "/nonexistent/checkpoint"], "does not exist"),
    (["--lam-min", "1.5", "--lam-max", "1.2"], "--lam-min 1.5 must be <= --lam-max 1.2"),
    (["--group-size", "1"], "--group-size"),
    (["--sketch-dim", "0"], "--sketch-dim"),
    (["--micro-batch", "-1"], "--micro-batch: must be >= 0"),
    pytest.param(["--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a CUDA device")),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_config_refused_by_run(tmp_path):
    with pytest.raises(ValueError, match="unknown credit method 'shapley'"):
        run(tiny_config(tmp_path, "bad", credit="shapley"))
    with pytest.raises(ValueError, match="--k"):
        run(tiny_config(tmp_path, "bad", k=-2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "missing"), torch.device("cpu"))


def test_defaults_parse():
    cfg = parse_config([])
    assert cfg.credit == "delta" and cfg.k == 1 and cfg.model is None and cfg.clip_high == 0.28


def test_model_path_loads_local_checkpoint_and_trains(tmp_path):
    """--model PATH: a local checkpoint + tokenizer saved with save_pretrained goes through
    AutoModelForCausalLM / AutoTokenizer and trains (no warm start by default)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    model, ct = tiny_model(seed=4)
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(ct.itos)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    fast.save_pretrained(ckpt)
    cfg = tiny_config(tmp_path, "from_path", model=str(ckpt), steps=2, sft_max_steps=None)
    assert parse_config(["--model", str(ckpt)]).model == str(ckpt)
    s = run(cfg)
    assert s["model"] == str(ckpt) and s["warm_start_steps"] == 0
    assert s["parameters"] == sum(p.numel() for p in model.parameters())
    rows = read_metrics(os.path.join(s["out"], "metrics.jsonl"))
    assert len(rows) == 2 and all(r["forwards_old_logprob"] == 1 for r in rows)


def test_cli_main_prints_summary(tmp_path, capsys):
    from delta_kernels.trainer.__main__ import main
    out = tmp_path / "cli"
    code = main(["--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--minibatches", "2",
                 "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--sft-max-steps", "0",
                 "--heldout-size", "8", "--credit", "none", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out greedy accuracy: before RL" in text and "model forwards per step" in text
    assert (out / "metrics.jsonl").exists() and (out / "curves.png").exists() and (out / "responses.html").exists()
