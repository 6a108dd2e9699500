"""torch.compile: every public call compiles with fullgraph=True (no graph break) on backends cpp and
torch; under aot_eager it equals eager (bit for bit on cpp, ~1e-5 on torch), gradients included; the
graph of a cpp call holds the delta_kernels:: ops; a whole training step matches eager on two batch
shapes with one recompile at most; inductor matches to ~1e-4; torch.library.opcheck passes for
every op on the arguments that real public calls pass it; bad shapes raise eager's error at trace time.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import delta_kernels as dk
from delta_kernels import _checks
from delta_kernels.backends import _native, _ops
from helpers import make_batch

BACKENDS = ("cpp", "torch")
B, T, H, V, R = 3, 7, 12, 19, 5  # sequences, tokens, hidden, vocabulary, sketch_dim


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "trace_autograd_ops", True)  # loss.backward() inside a compiled step
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(dtype=torch.float32, seed=0, n_seq=B, seq_len=T):
    h, logp, adv, mask = make_batch(n_seq, seq_len, H, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return dict(h=h, logp=logp, adv=adv, mask=mask, old=logp + 0.1 * torch.randn(logp.shape, generator=g).to(dtype),
                coef=torch.rand(logp.shape, generator=g) + 0.5, sums=torch.randn(2, H, generator=g).to(dtype),
                weight=torch.randn(V, H, generator=g).to(dtype), targets=torch.randint(0, V, logp.shape, generator=g),
                ent=torch.rand(logp.shape, generator=g) * 3)


def coefficients_call(src, sketch_dim, dtype):
    """delta_coefficients from hidden, or from vectors plus side sums; -> (coef, weighted, pred)."""
    def call(x, be):
        width = sketch_dim or H
        kw = dict(sketch_dim=sketch_dim, backend=be)
        if src == "hidden":
            r = dk.delta_coefficients(x["h"].to(dtype), x["logp"], x["adv"], x["mask"], **kw)
        else:
            r = dk.delta_coefficients(None, x["logp"], x["adv"], x["mask"], vectors=x["h"][..., :width].to(dtype),
                                      side_sums=x["sums"][:, :width], **kw)
        return r.coef, r.weighted_advantages, r.stats.pred
    return call


def surrogate_call(x, be, credit=None):
    logp = x["logp"].clone().requires_grad_()
    loss, metrics = dk.clipped_surrogate_loss(logp, x["old"].clamp_max(0), x["adv"], x["mask"], coef=x["coef"],
                                              credit=credit, entropy=x["ent"], backend=be)
    (grad,) = torch.autograd.grad(loss, logp)  # the gradient inside the compiled region
    return loss.detach(), grad, *(metrics[k] for k in sorted(metrics))


def credit_call(credit, fused=False):
    """A loss with in-loss credit (delta_kernels.credit): the fipo kernel and/or the entropy quantile compiled too."""
    return (lambda x, be: fused_surrogate_call(x, be, credit)) if fused else \
        (lambda x, be: surrogate_call(x, be, credit))


def fused_sketch_call(x, be):
    logp, ent, z, sums = dk.fused_linear_logprob_sketch(x["h"], x["weight"], x["targets"], sketch_dim=R, entropy=True,
                                                        advantages=x["adv"], mask=x["mask"])
    return logp, ent, z, sums


def fused_surrogate_call(x, be, credit=None):
    h, w = x["h"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    loss, metrics = dk.fused_linear_clipped_surrogate_loss(h, w, x["targets"], x["old"].clamp_max(0), x["adv"],
                                                           x["mask"], coef=x["coef"], credit=credit)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)), *(metrics[k] for k in sorted(metrics)))


def head_coefficients_call(x, be):
    """delta_coefficients on LM-head gradient factors (u, s): r1 = 4, r2 = R columns of the random h."""
    u, s = x["h"][..., :4], x["h"][..., -R:]
    r = dk.delta_coefficients(None, x["logp"], x["adv"], x["mask"], head_vectors=(u, s), backend=be)
    return r.coef, r.weighted_advantages, r.stats.pred


CALLS = {
    "token_sketch": lambda x, be: (dk.token_sketch(x["h"], x["logp"], backend=be),
                                   dk.token_sketch(x["h"], x["logp"], sketch_dim=R, seed=3, backend=be)),
    "coef_hidden_exact_f32": coefficients_call("hidden", None, torch.float32),
    "coef_hidden_sketch_bf16": coefficients_call("hidden", R, torch.bfloat16),
    "coef_vectors_exact_bf16": coefficients_call("vectors", None, torch.bfloat16),
    "coef_vectors_sketch_f32": coefficients_call("vectors", R, torch.float32),
    "clipped_surrogate_loss": surrogate_call,
    "fipo_weights": lambda x, be: tuple(dk.fipo_weights(x["logp"], x["old"].clamp_max(0), x["adv"], x["mask"],
                                                        backend=be)),
    **{f"clipped_surrogate_loss_credit_{c}": credit_call(c) for c in ("fipo", "entropy", "fipo*entropy")},
    "coef_head_vectors": lambda x, be: head_coefficients_call(x, be),
}
FUSED = {"fused_linear_logprob_sketch": fused_sketch_call, "fused_linear_clipped_surrogate_loss": fused_surrogate_call,
         **{f"fused_linear_clipped_surrogate_loss_credit_{c}": credit_call(c, fused=True)
            for c in ("fipo", "entropy", "fipo*entropy")},
         "sketch_matrix": lambda x, be: (dk.sketch_matrix(H, R, 7),),
         "entropy_mask": lambda x, be: (dk.entropy_mask(x["ent"], x["mask"], top_quantile=0.3),),
         "head_gradient_sketch": lambda x, be: dk.head_gradient_sketch(x["h"], x["weight"], x["targets"],
                                                                       vocab_sketch_dim=4, sketch_dim=R)}


def assert_equal_to_eager(out, ref, be):
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == r.dtype and o.shape == r.shape
        if be == "cpp":
            assert torch.equal(o, r)
        else:
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


def compile_and_compare(fn, x, be, backend="aot_eager"):
    """fullgraph=True (any graph break raises), one frame; -> (compiled outputs, eager outputs)."""
    counter = CompileCounterWithBackend(backend)
    out = torch.compile(fn, fullgraph=True, backend=counter)(x, be)
    assert counter.frame_count == 1
    return out, fn(x, be)


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("be", BACKENDS)
def test_call_compiles_whole_and_equals_eager(name, be):
    assert_equal_to_eager(*compile_and_compare(CALLS[name], inputs(), be), be)


@pytest.mark.parametrize("name", FUSED)
def test_fused_call_compiles_whole_and_equals_eager(name):
    assert_equal_to_eager(*compile_and_compare(FUSED[name], inputs(), "auto"), "torch")


def test_compiled_cpp_graph_holds_the_library_ops():
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = inputs()
    torch.compile(CALLS["coef_hidden_sketch_bf16"], fullgraph=True, backend=keep)(x, "cpp")
    torch.compile(surrogate_call, fullgraph=True, backend=keep)(x, "cpp")
    targets = {str(n.target).removesuffix(".default") for gm in graphs for sub in gm.modules()
               if isinstance(sub, torch.fx.GraphModule) for n in sub.graph.nodes if n.op == "call_function"}
    assert {"delta_kernels.token_vectors", "delta_kernels.margins", "delta_kernels.gated_margins",
            "delta_kernels.clipped_surrogate"} <= targets


def test_first_call_of_a_fresh_process_compiles_whole():
    """No lazy import inside the compiled region: the backend modules are imported at trace time."""
    script = textwrap.dedent(f"""
        import sys, torch
        import delta_kernels as dk
        assert "delta_kernels.backends.cpp" not in sys.modules
        h, logp, adv, mask = torch.randn(2, 3, 4), -torch.rand(2, 3), torch.randn(2), torch.ones(2, 3, dtype=torch.bool)
        def step(h, logp, adv, mask):
            z = dk.token_sketch(h, logp, sketch_dim=2, backend="cpp")
            coef = dk.delta_coefficients(None, logp, adv, mask, vectors=z, backend="cpp").coef
            loss, _ = dk.fused_linear_clipped_surrogate_loss(h, torch.ones(5, 4), torch.zeros(2, 3, dtype=torch.long),
                                                             logp, adv, mask, coef=coef)
            return loss
        torch.compile(step, fullgraph=True, backend="eager")(h, logp, adv, mask)
        assert "delta_kernels.backends.cpp" in sys.modules
        print("ok")
    """)
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


class Policy(torch.nn.Module):
    """hidden = tanh(x W1); logits = hidden W^T: phase A and B read hidden (detached), C the log-probs."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.body = torch.nn.Parameter(torch.randn(H, H, generator=g) / H**0.5)
        self.head = torch.nn.Parameter(torch.randn(V, H, generator=g))

    def forward(self, x, targets):
        hidden = torch.tanh(x @ self.body)
        logp = torch.log_softmax(hidden @ self.head.T, -1).gather(-1, targets[..., None])[..., 0]
        return hidden, logp


def training_step(policy, x, targets, old, adv, mask, be, backward_inside):
    hidden, logp = policy(x, targets)
    z = dk.token_sketch(hidden.detach(), logp.detach(), sketch_dim=R, backend=be)                   # phase A
    coef = dk.delta_coefficients(None, logp.detach(), adv, mask, vectors=z, sketch_dim=R, backend=be).coef  # B
    loss, _ = dk.clipped_surrogate_loss(logp, old, adv, mask, coef=coef, backend=be)                # phase C
    if backward_inside:
        loss.backward()
        return loss.detach()
    return loss


def run_steps(step, be, backward_inside):
    """Two batches of different shapes -> (losses and parameter gradients per batch)."""
    out = []
    for seed, (n_seq, seq_len) in enumerate(((B, T), (B + 2, T + 3))):
        policy, x = Policy(), inputs(seed=seed, n_seq=n_seq, seq_len=seq_len)
        feats = x["h"]
        loss = step(policy, feats, x["targets"], x["old"], x["adv"], x["mask"], be, backward_inside)
        if not backward_inside:
            loss.backward()
        out.append((loss.detach(), policy.body.grad, policy.head.grad))
    return out


@pytest.mark.parametrize("backward_inside", [False, True])
@pytest.mark.parametrize("be", BACKENDS)
def test_training_step_matches_eager_with_one_recompile_at_most(be, backward_inside):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = run_steps(torch.compile(training_step, fullgraph=True, backend=counter), be, backward_inside)
    assert counter.frame_count <= 2  # the first shape, and one dynamic-shape recompile
    for got, ref in zip(compiled, run_steps(training_step, be, backward_inside), strict=True):
        assert_equal_to_eager(got, ref, be)


def test_inductor_matches_eager():
    x = inputs()
    out, ref = compile_and_compare(surrogate_call, x, "cpp", backend="inductor")
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-6)


class Recorder:
    """Stands in for backends/_ops.call (in _native.py) and for cpp's torch.ops.delta_kernels: records each op's
    arguments, then runs the op itself (the dispatcher's path, as under compile)."""

    def __init__(self):
        self.calls = []

    def record(self, name, *args):
        self.calls.append((name, tuple(a.detach().clone().requires_grad_(a.requires_grad)
                                       if isinstance(a, torch.Tensor) else a for a in args)))
        return getattr(torch.ops.delta_kernels, name).default(*args)

    def __getattr__(self, name):
        return SimpleNamespace(default=lambda *args: self.record(name, *args))


def test_opcheck_on_the_arguments_of_real_calls(monkeypatch):
    from delta_kernels.backends import cpp
    recorder = Recorder()
    monkeypatch.setattr(_native, "call", recorder.record)
    fipo_args = []  # the fipo kernel's custom op (eager calls its body: reference.fipo.call_native)
    monkeypatch.setattr(cpp, "call_native", lambda op, body, *args: fipo_args.append(args) or body(*args))
    x = inputs()
    for name in CALLS:
        CALLS[name](x, "cpp")
    recorder.record("sketch_matrix", H, R, 7)  # the op no public call reaches (tests/test_cpp.py)
    seen = {}
    for name, args in recorder.calls:  # one case per op and pattern of optional (None) arguments and dtypes
        key = (name, tuple(None if a is None else getattr(a, "dtype", type(a)) for a in args))
        seen.setdefault(key, args)
    assert {k[0] for k in seen} == set(_ops.SCHEMAS)
    assert any(k[0] == "clipped_surrogate" and k[1][4] is not None for k in seen)  # with coef
    cases = list(seen.items())
    for (name, key), args in seen.items():  # the surrogate's autograd formula: the same arguments, logp requiring grad
        if name == "clipped_surrogate":
            cases.append(((name, key), (args[0].clone().requires_grad_(),) + args[1:]))
    cases += [(("fipo_weights_cpp", None), fipo_args[0])]
    for (name, _), args in cases:
        result = torch.library.opcheck(getattr(torch.ops.delta_kernels, name).default, args)
        assert set(result.values()) == {"SUCCESS"}, (name, result)


@pytest.mark.parametrize("be", BACKENDS)
def test_bad_shape_raises_eagers_error_at_trace_time(be):
    x = inputs()

    def call(x, be):
        return dk.delta_coefficients(x["h"], x["logp"][:, :-1], x["adv"], x["mask"], backend=be).coef

    error = r"mask: shape \[3, 7\] does not match logp's \[3, 6\]"
    with pytest.raises(ValueError, match=f"^{error}$"):
        call(x, be)
    with pytest.raises(ValueError, match=f"^{error}$"):  # raised while tracing
        torch.compile(call, backend="eager")(x, be)
    torch._dynamo.reset()
    # fullgraph=True: torch wraps an exception raised while tracing in Unsupported, caused by it
    with pytest.raises(torch._dynamo.exc.Unsupported) as raised:
        torch.compile(call, fullgraph=True, backend="eager")(x, be)
    assert 'ValueError("mask: shape [3, 7] does not match logp\'s [3, 6]")' in str(raised.value.__cause__)


def test_value_checks_under_compile(monkeypatch):
    """Unchecked by default (docs/reliability.md); with COMPILE_VALUE_CHECKS a device assert names the argument."""
    x = inputs()
    x["logp"][0, 0] = 0.5  # a valid position (make_batch's mask is regenerated per seed: make it valid)
    x["mask"][0, 0] = True

    def call(x, be):
        return dk.delta_coefficients(x["h"], x["logp"], x["adv"], x["mask"], backend=be).coef

    with pytest.raises(ValueError, match="^logp: log-probabilities must be <= 0; found 0.5 at flat index 0$"):
        call(x, "cpp")
    torch.compile(call, fullgraph=True, backend="aot_eager")(x, "cpp")  # not read: no error
    monkeypatch.setattr(_checks, "COMPILE_VALUE_CHECKS", True)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="logp: log-probabilities must be <= 0"):
        torch.compile(call, fullgraph=True, backend="aot_eager")(x, "cpp")
    good = inputs()  # the asserts keep the graph whole and change no result
    for name in ("coef_hidden_exact_f32", "clipped_surrogate_loss"):
        torch._dynamo.reset()
        assert_equal_to_eager(*compile_and_compare(CALLS[name], good, "cpp"), "cpp")


@pytest.mark.parametrize("call", ["fipo_weights", "entropy_mask"])
def test_credit_value_checks_under_compile(monkeypatch, call):
    """The credit calls' value checks: eager raises; compiled, nothing is read unless COMPILE_VALUE_CHECKS."""
    x = inputs()
    x["mask"][0, 0] = True
    if call == "fipo_weights":
        x["old"][0, 0] = float("nan")
        fn, error = CALLS[call], "old_logp: non-finite value"
    else:
        x["ent"][0, 0] = float("inf")
        fn, error = FUSED[call], "entropy: non-finite value"
    with pytest.raises(ValueError, match=f"^{error}"):
        fn(x, "cpp")
    torch.compile(fn, fullgraph=True, backend="aot_eager")(x, "cpp")  # not read: no error
    monkeypatch.setattr(_checks, "COMPILE_VALUE_CHECKS", True)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=error):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(x, "cpp")
    torch._dynamo.reset()  # the asserts keep the graph whole and change no result
    assert_equal_to_eager(*compile_and_compare(fn, inputs(), "cpp"), "cpp")


def test_entropy_quantile_over_ranks_is_refused_under_compile(tmp_path):
    """The gather over a process group reads sizes on the host: refused while tracing, naming process_group."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        x = inputs()
        call = torch.compile(lambda e, m: dk.entropy_mask(e, m, process_group=dist.group.WORLD), fullgraph=True,
                             backend="eager")
        with pytest.raises(torch._dynamo.exc.Unsupported) as raised:
            call(x["ent"], x["mask"])
        assert "ValueError('process_group: the entropy quantile over ranks" in str(raised.value.__cause__)
        assert torch.equal(dk.entropy_mask(x["ent"], x["mask"], process_group=dist.group.WORLD),
                           dk.entropy_mask(x["ent"], x["mask"]))  # eager: one rank, the local quantile
    finally:
        dist.destroy_process_group()


def test_cuda_backend_registers_its_kernels_for_cuda():
    """The cuda backend's op bodies are registered when its module imports (its build imports without a GPU)."""
    pytest.importorskip("delta_kernels._cuda")
    import delta_kernels.backends.cuda  # noqa: F401
    for name in set(_ops.SCHEMAS) - {"sketch_matrix"}:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(_ops.qualname(name), "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(_ops.qualname(name), "CPU"), name


@pytest.mark.slow  # the model's forward and backward traced by dynamo: about a minute of CPU
def test_trainer_compiled_step_equals_eager(monkeypatch):
    """--compile (UpdateConfig.compile) runs the trainer's phases compiled (here under aot_eager) to eager's numbers."""
    pytest.importorskip("transformers")
    from delta_kernels.trainer import step as S
    from delta_kernels.trainer.model import ModelSize, build_default_model
    from delta_kernels.trainer.task import AdditionTask
    from delta_kernels.trainer.tokenizer import CharTokenizer
    counter = CompileCounterWithBackend("aot_eager")
    for fn in (S.old_logprob_pass, S.credit_coefficients, S.policy_loss):
        monkeypatch.setitem(S._COMPILED, fn, torch.compile(fn, backend=counter))
    out = {}
    for compiled in (False, True):
        tok = CharTokenizer()
        model, _ = build_default_model(tok.vocab_size, ModelSize(hidden_size=16, num_layers=1, num_heads=2,
                                                                 num_kv_heads=1, intermediate_size=24),
                                       0, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        res = S.rl_step(model.eval(), opt, tok, AdditionTask(), prompts_per_step=2, group_size=4, max_new_tokens=3,
                        credit=S.CreditConfig(backend="cpp"), update=S.UpdateConfig(minibatches=1, compile=compiled),
                        generator=torch.Generator().manual_seed(0))
        out[compiled] = res.metrics, [p.detach().clone() for p in model.parameters()]
    assert counter.frame_count >= 3  # the three phases ran compiled
    for key in ("loss", "clip_frac", "coef_min", "coef_max", "entropy"):
        assert out[True][0][key] == pytest.approx(out[False][0][key], rel=1e-5, abs=1e-7), key
    for p, q in zip(out[True][1], out[False][1], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
