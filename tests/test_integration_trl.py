"""DeltaGRPOTrainer (trl 1.16) on a tiny Qwen3 and a character tokenizer, CPU, offline."""
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import delta_kernels as dk  # noqa: E402
from delta_kernels.integrations.trl import DeltaGRPOTrainer  # noqa: E402
from integration_models import char_tokenizer, prompts, tiny_model  # noqa: E402
from delta_kernels.integrations import response_hidden_states  # noqa: E402

ON_POLICY = dict(num_iterations=1)       # TRL runs no old-log-prob pass
OLD_PASS = dict(num_iterations=2)        # TRL runs its old-log-prob pass


def reward(completions, **kw):
    return [float(c.count("1")) - 0.3 * len(c) for c in completions]


def make(cls=DeltaGRPOTrainer, model=None, delta=dict(k=1), peft_config=None, **cfg):
    kw = dict(output_dir="/tmp/delta_trl_test", per_device_train_batch_size=4, num_generations=4,
              max_completion_length=6, max_steps=3, learning_rate=1e-2, use_cpu=True, report_to=[], logging_steps=1,
              save_strategy="no", disable_dropout=True, seed=0, temperature=0.9)
    kw.update(cfg)
    extra = {} if cls is trl.GRPOTrainer else dict(delta=delta)
    return cls(model=tiny_model() if model is None else model, reward_funcs=reward, args=trl.GRPOConfig(**kw),
               processing_class=char_tokenizer(), train_dataset=datasets.Dataset.from_dict({"prompt": prompts(16)}),
               peft_config=peft_config, **extra)


@pytest.fixture
def rows_carry_plain_advantages_and_coef(monkeypatch):
    """Each generation batch row carries TRL's own advantage (``plain_adv`` [B]) and its DelTA
    coefficients (``coef`` [B, T]) through TRL's shuffle and split, so a loss call can be redone."""
    child = DeltaGRPOTrainer._generate_and_score_completions

    def with_coef(self, inputs):
        out = child(self, inputs)
        out["coef"] = self.delta_last.coef
        return out
    keep_plain_advantages(monkeypatch)
    monkeypatch.setattr(DeltaGRPOTrainer, "_generate_and_score_completions", with_coef)


def keep_plain_advantages(monkeypatch):
    """TRL's own advantages (before DelTA's fold) travel in each generation batch as ``plain_adv``."""
    parent = trl.GRPOTrainer._generate_and_score_completions

    def with_plain(self, inputs):
        out = parent(self, inputs)
        out["plain_adv"] = out["advantages"].clone()
        return out
    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", with_plain)


def unfused_old_pass(trainer, out):
    """The model's own unfused forward on a generation batch, on the parameters of the capture:
    (response hidden states [B, R, H], response log-probs [B, R], 0 at padding)."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    r = out["completion_ids"].shape[1]
    with torch.no_grad():
        o = trainer.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h = response_hidden_states(o.hidden_states[-1], r, attention_mask=mask)
    logp = torch.log_softmax(o.logits[:, -r - 1:-1] / trainer.temperature, -1)
    return h, logp.gather(-1, out["completion_ids"][..., None])[..., 0] * out["completion_mask"]


def inject_tool_mask(monkeypatch):
    """TRL marks tool-output tokens in ``tool_mask`` once generation is done, after its
    old-log-prob pass: here a random quarter of each completion (never its first token)."""
    parent = trl.GRPOTrainer._generate_and_score_completions
    g = torch.Generator().manual_seed(7)

    def with_tool_mask(self, inputs):
        out = parent(self, inputs)
        tool = (torch.rand(out["completion_mask"].shape, generator=g) >= 0.25).long()
        tool[:, 0] = 1
        out["tool_mask"] = tool
        return out
    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", with_tool_mask)


@pytest.mark.parametrize("regime,sketch_dim,tools", [(ON_POLICY, None, False), (OLD_PASS, None, False),
                                                     (OLD_PASS, 16, False), (OLD_PASS, None, True)],
                         ids=["on_policy", "old_pass", "old_pass_sketch", "old_pass_tool_mask"])
def test_coefficients_equal_delta_coefficients_and_parameters_move(regime, sketch_dim, tools, monkeypatch):
    if tools:
        inject_tool_mask(monkeypatch)
    seen = []
    orig = DeltaGRPOTrainer._generate_and_score_completions

    def spy(self, inputs):
        out = orig(self, inputs)
        seen.append((*unfused_old_pass(self, out), out))
        return out

    keep_plain_advantages(monkeypatch)
    monkeypatch.setattr(DeltaGRPOTrainer, "_generate_and_score_completions", spy)
    tr = make(delta=dict(k=1, sketch_dim=sketch_dim), **regime)
    p0 = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    moved = sum(float((a - b.detach()).abs().sum()) for a, b in zip(p0, tr.model.parameters()))
    assert moved > 0
    assert len(seen) == (3 if regime is ON_POLICY else 2)
    h, logp, out = seen[-1]
    res = tr.delta_last
    mask = out["completion_mask"].bool()
    if tools:  # TRL's loss mask; the tool tokens get no coefficient and no advantage
        assert not bool(out["tool_mask"][mask].all())
        mask = mask & out["tool_mask"].bool()
    ref = dk.delta_coefficients(h.double(), logp.double(), out["plain_adv"].double(), mask, k=1,
                                sketch_dim=sketch_dim, backend="torch")
    torch.testing.assert_close(res.coef.double(), ref.coef, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(out["advantages"].double(), ref.weighted_advantages, rtol=2e-4, atol=2e-4)
    assert res.coef[mask].std() > 0.01 and res.stats.n_valid.item() == mask.sum().item()


def _count_body_forwards(trainer):
    """Body forwards outside generation (TRL's fused head runs the body with use_cache=False)."""
    count = [0]

    def pre(module, args, kwargs):
        if kwargs.get("use_cache") is False:
            count[0] += 1
    trainer.model.get_decoder().register_forward_pre_hook(pre, with_kwargs=True)
    trainer.train()
    return count[0]


@pytest.mark.parametrize("regime,extra", [(ON_POLICY, 3), (OLD_PASS, 0)], ids=["on_policy", "old_pass"])
def test_body_forward_count(regime, extra):
    plain = _count_body_forwards(make(trl.GRPOTrainer, **regime))
    delta = _count_body_forwards(make(**regime))
    assert delta == plain + extra  # on-policy: one chunk (4 rows) per generation batch, 3 generations


def test_delta_none_is_plain_grpo():
    a = make(trl.GRPOTrainer)
    a.train()
    b = make(delta=None)
    b.train()
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model saved locally: TRL builds the reference model (beta > 0) from a path."""
    path = tmp_path_factory.mktemp("tiny_qwen3")
    tiny_model().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("cfg", [dict(loss_type="grpo"), dict(loss_type="dr_grpo"), dict(loss_type="dapo"),
                                 dict(loss_type="bnpo", steps_per_generation=2, gradient_accumulation_steps=1),
                                 dict(loss_type="dapo", beta=0.1, cast_lm_head_to_fp32=True)],
                         ids=["grpo", "dr_grpo", "dapo", "bnpo_spg2", "beta_fp32head"])
def test_loss_types_and_options_train(cfg, model_dir):
    tr = make(model=model_dir if cfg.get("beta") else None, **cfg)
    p0 = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert sum(float((a - b.detach()).abs().sum()) for a, b in zip(p0, tr.model.parameters())) > 0
    assert tr.delta_last is not None and torch.isfinite(tr.delta_last.coef).all()


def test_peft_lora_with_reference_through_disabled_adapter():
    peft = pytest.importorskip("peft")
    tr = make(peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), beta=0.1, **OLD_PASS)
    lora = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_B" in n}
    tr.train()
    assert any(not torch.equal(p, dict(tr.model.named_parameters())[n]) for n, p in lora.items())
    assert torch.isfinite(tr.delta_last.coef).all() and tr.delta_last.coef.std() > 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_trl_loss_equals_clipped_surrogate_with_coef(loss_type, monkeypatch, rows_carry_plain_advantages_and_coef):
    """Every loss TRL computes in training, on the DelTA-weighted advantages, equals
    clipped_surrogate_loss(coef=..., **trl_loss_aggregation(...)) on TRL's plain advantages (TRL
    has no dual clip: clip_c never binds). Two micro-batches per step, two iterations per
    generation: the last two calls run after an optimizer step, so the ratios move."""
    calls = []
    original = DeltaGRPOTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = inputs["completion_mask"]
        with torch.no_grad():  # the same parameters and inputs as TRL's own call
            logp, _, _ = self._get_per_token_logps_and_entropies(model, ids, torch.cat([inputs["prompt_mask"], mask], 1),
                                                                 mask.shape[1])
        old = inputs.get("old_per_token_logps")
        old = logp if old is None else old
        agg = dk.aggregation.trl_loss_aggregation(
            self.loss_type, mask, max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs["num_items_in_batch"], num_processes=self.accelerator.num_processes,
            gradient_accumulation_steps=self.current_gradient_accumulation_steps,
            steps_per_generation=self.args.steps_per_generation)
        ours, _ = dk.clipped_surrogate_loss(logp.double(), old.double(), inputs["plain_adv"].double(), mask.bool(),
                                            coef=inputs["coef"].double(), clip_low=self.epsilon_low,
                                            clip_high=self.epsilon_high, clip_c=1e9, backend="torch", **agg)
        calls.append((loss.detach().double(), ours, float((logp - old).abs().max())))
        return loss

    monkeypatch.setattr(DeltaGRPOTrainer, "compute_loss", compute_loss)
    lengths = []
    spy_lengths = DeltaGRPOTrainer._generate_and_score_completions

    def generate(self, inputs):
        out = spy_lengths(self, inputs)
        lengths.append(out["completion_mask"].sum(1))
        return out
    monkeypatch.setattr(DeltaGRPOTrainer, "_generate_and_score_completions", generate)
    # EOS made likely after two tokens: completions of different lengths tell the normalisers apart
    tr = make(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, gradient_accumulation_steps=2, max_steps=2,
              max_completion_length=8, generation_kwargs=dict(exponential_decay_length_penalty=(2, 3.0)),
              **OLD_PASS)
    tr.train()
    assert len(calls) == 4 and len(lengths) == 1
    assert len(set(lengths[0].tolist())) > 1, lengths
    for theirs, ours, _ in calls:
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-7)
    assert max(moved for _, _, moved in calls[2:]) > 1e-3  # off-policy ratios in the later calls


def test_bad_delta_options_are_refused():
    with pytest.raises(ValueError, match="delta: unknown keys \\['kk'\\]"):
        make(delta=dict(kk=1))
    with pytest.raises(ValueError, match="lam_min"):
        make(delta=dict(k=1, lam_min=-1.0))
    with pytest.raises(ValueError, match="loss_type: 'sapo' is not supported"):
        make(loss_type="sapo")


def test_two_processes_give_the_single_process_coefficients(tmp_path):
    """Two accelerate/gloo ranks: each rank's coefficients are those of one delta_coefficients call
    over both ranks' tokens (the statistics are global)."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", os.path.join(root, "tests", "trl_dist_worker.py"), str(tmp_path)]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    flat = {k: torch.cat([d[k][d["mask"]] for d in ranks]) for k in ("hidden", "logp", "coef")}
    adv = torch.cat([d["advantages"][:, None].expand_as(d["mask"])[d["mask"]] for d in ranks])
    ref = dk.delta_coefficients(flat["hidden"].double(), flat["logp"].double(), adv.double(),
                                torch.ones_like(adv, dtype=torch.bool), k=1, backend="torch")
    torch.testing.assert_close(flat["coef"].double(), ref.coef, rtol=2e-4, atol=2e-4)
    for d in ranks:  # both ranks hold the global temperatures
        torch.testing.assert_close(d["gamma"].double(), torch.stack([ref.stats.gamma_pos, ref.stats.gamma_neg]),
                                   rtol=2e-4, atol=1e-5)
