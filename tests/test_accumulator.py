"""DeltaAccumulator: random splits into micro-batches give delta_coefficients on the concatenation."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import delta_kernels as dk
import delta_kernels.reference as reference
from backend_cases import cpu_backend_params
from helpers import TOL, CountingPasses, assert_rel

H = 12
COMPILED = [p for p in cpu_backend_params() if not p.values[0].interpreted]  # the registry's, on CPU tensors
INTERPRETED = [p for p in cpu_backend_params() if p.values[0].interpreted]  # fewer examples


def dtype_of(backend):
    """float64 on a backend that computes in it (the reference), else float32."""
    return torch.float64 if torch.float64 in backend.declaration.dtypes else torch.float32


def make_adds(shapes, seed, width=H, dtype=torch.float32):
    """One micro-batch per shape ((n,) or (b, T)): fresh random hidden, logp, per-token or per-row
    advantages, mask; and the flat concatenation (hidden [N, H], logp, advantages, mask [N])."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(width, generator=g)
    adds = []
    for shape in shapes:
        h = torch.randn(*shape, width, generator=g) + offset
        logp = -torch.rand(*shape, generator=g) * 3 - 1e-3
        per_row = len(shape) == 2 and bool(torch.rand(1, generator=g) < 0.5)
        adv = torch.randn(shape[0] if per_row else shape, generator=g)
        adv[torch.rand(adv.shape, generator=g) < 0.15] = 0
        mask = torch.rand(*shape, generator=g) >= 0.2
        adds.append(dict(hidden=h.to(dtype), logp=logp.to(dtype), advantages=adv.to(dtype), mask=mask))
    flat = dict(hidden=torch.cat([a["hidden"].reshape(-1, width) for a in adds]),
                logp=torch.cat([a["logp"].reshape(-1) for a in adds]),
                advantages=torch.cat([(a["advantages"][:, None].expand(a["logp"].shape) if a["advantages"].shape
                                       != a["logp"].shape else a["advantages"]).reshape(-1) for a in adds]),
                mask=torch.cat([a["mask"].reshape(-1) for a in adds]))
    return adds, flat


def accumulate(adds, *, early, vectors=None, concat_adv=False, **kw):
    acc = dk.DeltaAccumulator(**kw)
    for i, a in enumerate(adds):
        src = dict(hidden=a["hidden"]) if vectors is None else dict(vectors=vectors[i])
        acc.add(**src, logp=a["logp"], mask=a["mask"], advantages=a["advantages"] if early else None)
    if early:
        return acc.finalize()
    if concat_adv:
        return acc.finalize(torch.cat([a["advantages"].reshape(-1) if a["advantages"].shape == a["logp"].shape
                                       else a["advantages"][:, None].expand(a["logp"].shape).reshape(-1)
                                       for a in adds]))
    return acc.finalize([a["advantages"] for a in adds])


shapes_st = st.lists(st.one_of(st.tuples(st.integers(1, 7)), st.tuples(st.integers(1, 3), st.integers(1, 5))),
                     min_size=1, max_size=4)


def check_split(backend, shapes, seed, k, sketch_dim, early, store, concat_adv, use_vectors):
    dtype = dtype_of(backend)
    adds, flat = make_adds(shapes, seed, dtype=dtype)
    kw = dict(k=k, sketch_dim=sketch_dim, seed=seed % 7, backend=backend)
    vectors = None
    if use_vectors:
        vectors = [dk.token_sketch(a["hidden"], a["logp"], sketch_dim=sketch_dim, seed=seed % 7, backend="torch")
                   for a in adds]
        one = dk.delta_coefficients(None, flat["logp"], flat["advantages"], flat["mask"],
                                    vectors=torch.cat([v.reshape(-1, v.shape[-1]) for v in vectors]), **kw)
    else:
        one = dk.delta_coefficients(flat["hidden"], flat["logp"], flat["advantages"], flat["mask"], **kw)
    res = accumulate(adds, early=early, vectors=vectors, concat_adv=concat_adv, store=store, **kw)
    assert len(res) == len(adds)
    for r, a in zip(res, adds):
        assert r.coef.shape == a["logp"].shape and r.stats.pred.shape == a["logp"].shape
    tol = 1e-10 if dtype == torch.float64 else TOL[torch.float32]
    assert_rel(torch.cat([r.coef.reshape(-1) for r in res]), one.coef, tol, "coef")
    assert_rel(torch.cat([r.weighted_advantages.reshape(-1) for r in res]), one.weighted_advantages, tol, "weighted")
    assert_rel(torch.cat([r.stats.pred.reshape(-1) for r in res]), one.stats.pred, tol * 10, "pred")
    for name in ("mu_pos", "mu_neg", "gamma_pos", "gamma_neg", "scale"):
        assert_rel(getattr(res[-1].stats, name), getattr(one.stats, name), tol * 10, name)
    assert res[0].stats.n_valid.item() == flat["mask"].sum().item()


split_args = dict(shapes=shapes_st, seed=st.integers(0, 10**6), k=st.integers(0, 3),
                  sketch_dim=st.sampled_from([None, 5]), early=st.booleans(),
                  store=st.sampled_from(["device", "host", "auto"]),
                  concat_adv=st.booleans(), use_vectors=st.booleans())


@pytest.mark.parametrize("backend", COMPILED)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**split_args)
def test_random_splits_match_one_call(backend, shapes, seed, k, sketch_dim, early, store, concat_adv, use_vectors):
    check_split(backend, shapes, seed, k, sketch_dim, early, store, concat_adv, use_vectors)


@pytest.mark.parametrize("backend", INTERPRETED)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**split_args)
def test_random_splits_match_one_call_interpreted(backend, shapes, seed, k, sketch_dim, early, store, concat_adv,
                                                  use_vectors):
    check_split(backend, shapes, seed, k, sketch_dim, early, store, concat_adv, use_vectors)


def test_bitwise_repeatable_for_a_fixed_split():
    adds, _ = make_adds([(3, 4), (5,), (2, 6)], seed=4)
    runs = [accumulate(adds, early=False, k=2, backend="cpp", store=s) for s in ("device", "host", "device")]
    for other in runs[1:]:
        for r, o in zip(runs[0], other):
            assert torch.equal(r.coef, o.coef) and torch.equal(r.stats.mu_pos, o.stats.mu_pos)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("sketch_dim", [None, 4])
def test_reads_per_finalize(monkeypatch, k, early, sketch_dim):
    """The read count of the docstring: 1 (k = 0) or k + 2 passes, plus 1 with late advantages;
    host mode copies each chunk back once per read."""
    counting = CountingPasses()
    monkeypatch.setattr(reference, "PIPELINE_KERNELS", counting)
    adds, _ = make_adds([(2, 3), (4,), (1, 5)], seed=k)
    acc = dk.DeltaAccumulator(k=k, sketch_dim=sketch_dim, store="host", backend="torch")
    for a in adds:
        acc.add(a["hidden"], a["logp"], a["mask"], advantages=a["advantages"] if early else None)
    counting.reads = 0
    acc.finalize(None if early else [a["advantages"] for a in adds])
    reads = (1 if k == 0 else k + 2) + (0 if early else 1)
    assert counting.reads == reads * len(adds)
    assert acc._chunk_store.transfers == reads * len(adds)


def test_sketch_store_keeps_z_and_host_store_keeps_a_copy():
    adds, flat = make_adds([(2, 4), (3,)], seed=11)
    one = dk.delta_coefficients(flat["hidden"], flat["logp"], flat["advantages"], flat["mask"], k=1, sketch_dim=6,
                                backend="cpp")
    sketch = accumulate(adds, early=True, store="sketch", sketch_dim=6, k=1, backend="cpp")
    assert_rel(torch.cat([r.coef.reshape(-1) for r in sketch]), one.coef, TOL[torch.float32], "sketch coef")
    exact = accumulate(adds, early=False, store="device", k=1, backend="cpp")
    acc = dk.DeltaAccumulator(k=1, store="host", backend="cpp")
    for a in adds:
        acc.add(a["hidden"], a["logp"], a["mask"])
        a["hidden"].mul_(-3.0)  # the caller reuses its buffer: host mode kept a copy
    host = acc.finalize([a["advantages"] for a in adds])
    for r, e in zip(host, exact):
        assert torch.equal(r.coef, e.coef)


def test_concatenated_advantages_per_row_and_per_token():
    adds, flat = make_adds([(2, 3), (1, 3), (4, 3)], seed=8)
    per_token = [a["advantages"] if a["advantages"].shape == a["logp"].shape
                 else a["advantages"][:, None].expand(a["logp"].shape) for a in adds]
    one = dk.delta_coefficients(flat["hidden"].double(), flat["logp"].double(), flat["advantages"].double(),
                                flat["mask"], k=1, backend="torch")
    for adv in (torch.cat(per_token), torch.cat(per_token).reshape(-1), [t.clone() for t in per_token]):
        acc = dk.DeltaAccumulator(k=1, backend="torch")
        for a in adds:
            acc.add(a["hidden"].double(), a["logp"].double(), a["mask"])
        res = acc.finalize(adv if isinstance(adv, list) else adv.double())
        assert_rel(torch.cat([r.coef.reshape(-1) for r in res]), one.coef, 1e-10, f"coef {type(adv)}")
    acc = dk.DeltaAccumulator(backend="torch")
    with pytest.raises(ValueError, match="add 0: logp: an add needs at least one token"):
        acc.add(torch.randn(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    acc.add(adds[0]["hidden"], adds[0]["logp"], adds[0]["mask"])
    acc.add(torch.randn(2, 5, H), -torch.rand(2, 5), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"add 1: advantages: shape \[2, 3\]"):
        acc.finalize(torch.randn(4, 3))


def test_an_error_inside_finalize_spends_the_accumulator(monkeypatch):
    class Failing(CountingPasses):
        def margin_pass(self, v, *args):
            raise MemoryError("out of memory in a pass")

    monkeypatch.setattr(reference, "PIPELINE_KERNELS", Failing())
    adds, _ = make_adds([(2, 3)], seed=1)
    acc = dk.DeltaAccumulator(backend="torch")
    acc.add(adds[0]["hidden"], adds[0]["logp"], adds[0]["mask"])
    with pytest.raises(MemoryError):
        acc.finalize([adds[0]["advantages"]])
    with pytest.raises(RuntimeError, match=r"spent \(an error while finalize ran\)"):
        acc.finalize([adds[0]["advantages"]])


def test_bad_use_errors():
    adds, _ = make_adds([(2, 3), (4,)], seed=9)
    a, b = adds
    acc = dk.DeltaAccumulator(backend="torch")
    acc.add(a["hidden"], a["logp"], a["mask"])
    with pytest.raises(ValueError, match="add 1: vectors: add 0 passed hidden"):
        acc.add(vectors=b["hidden"], logp=b["logp"], mask=b["mask"])
    with pytest.raises(ValueError, match="add 1: advantages: give advantages at every add or at none"):
        acc.add(b["hidden"], b["logp"], b["mask"], advantages=b["advantages"])
    with pytest.raises(ValueError, match=r"add 1: mask: shape \[3\]"):
        acc.add(b["hidden"], b["logp"], b["mask"][:3])
    with pytest.raises(ValueError, match=r"add 1: hidden: shape"):
        acc.add(b["hidden"][:3], b["logp"], b["mask"])
    with pytest.raises(ValueError, match="add 1: hidden: last dim 5 differs from add 0's 12"):
        acc.add(b["hidden"][:, :5], b["logp"], b["mask"])
    with pytest.raises(ValueError, match="add 1: hidden: dtype torch.float64 differs"):
        acc.add(b["hidden"].double(), b["logp"], b["mask"])
    with pytest.raises(ValueError, match="add 1: logp: dtype torch.float64 differs"):
        acc.add(b["hidden"], b["logp"].double(), b["mask"])
    with pytest.raises(ValueError, match="add 1: hidden: a meta tensor holds no data"):  # the input gate
        acc.add(b["hidden"].to("meta"), b["logp"].to("meta"), b["mask"].to("meta"))
    with pytest.raises(ValueError, match="advantages: missing"):
        acc.finalize()
    with pytest.raises(ValueError, match="advantages: 1 tensors for 1 adds|add 0: advantages: shape"):
        acc.finalize([b["advantages"]])
    acc.add(b["hidden"], b["logp"], b["mask"])  # still usable after every error above
    with pytest.raises(ValueError, match=r"add 1: advantages: shape \[3\]"):
        acc.finalize([a["advantages"], b["advantages"][:3]])
    with pytest.raises(ValueError, match="advantages: 1 tensors for 2 adds"):
        acc.finalize([a["advantages"]])
    with pytest.raises(ValueError, match=r"advantages: shape \[5\]"):
        acc.finalize(torch.randn(5))
    res = acc.finalize([a["advantages"], b["advantages"]])
    assert len(res) == 2
    with pytest.raises(RuntimeError, match="add: this DeltaAccumulator is spent"):
        acc.add(a["hidden"], a["logp"], a["mask"])
    with pytest.raises(RuntimeError, match="finalize: this DeltaAccumulator is spent"):
        acc.finalize([a["advantages"], b["advantages"]])


def test_bad_use_errors_early_advantages_and_sketch_widths():
    adds, _ = make_adds([(2, 3), (4,)], seed=2)
    a, b = adds
    acc = dk.DeltaAccumulator(backend="torch", sketch_dim=4)
    with pytest.raises(ValueError, match="add 0: vectors: last dim 5 differs from sketch_dim=4"):
        acc.add(vectors=torch.randn(2, 3, 5), logp=a["logp"], mask=a["mask"], advantages=a["advantages"])
    acc.add(vectors=torch.randn(2, 3, 4), logp=a["logp"], mask=a["mask"], advantages=a["advantages"])
    with pytest.raises(ValueError, match="add 1: vectors: last dim 5 differs from add 0's 4"):
        acc.add(vectors=torch.randn(4, 5), logp=b["logp"], mask=b["mask"], advantages=b["advantages"])
    with pytest.raises(ValueError, match="add 1: advantages: .*add 0 had them"):
        acc.add(vectors=torch.randn(4, 4), logp=b["logp"], mask=b["mask"])
    with pytest.raises(ValueError, match="advantages: given twice"):
        acc.finalize([a["advantages"]])
    assert len(acc.finalize()) == 1
    with pytest.raises(RuntimeError, match="finalize: nothing was added"):
        dk.DeltaAccumulator().finalize(torch.zeros(1))
    exact = dk.DeltaAccumulator(backend="torch")
    exact.add(vectors=torch.randn(2, 3, 4), logp=a["logp"], mask=a["mask"])
    with pytest.raises(ValueError, match="add 1: vectors: last dim 6 differs from add 0's 4"):
        exact.add(vectors=torch.randn(4, 6), logp=b["logp"], mask=b["mask"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(store="disk"), "store: unknown store 'disk'"),
    (dict(store="sketch"), "store: 'sketch' keeps z"),
    (dict(backend="gpu"), "backend: unknown backend 'gpu'"),
    (dict(k=-1), "k: must be >= 0"),
    (dict(sketch_dim=0), "sketch_dim: must be >= 1"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dk.DeltaAccumulator(**kwargs)


def test_missing_logp_and_mask_are_named():
    acc = dk.DeltaAccumulator()
    with pytest.raises(TypeError, match="add 0: logp: required"):
        acc.add(torch.randn(3, 4))
    with pytest.raises(TypeError, match="add 0: mask: required"):
        acc.add(torch.randn(3, 4), -torch.rand(3))
    with pytest.raises(ValueError, match="add 0: hidden: pass exactly one of hidden and vectors"):
        acc.add(torch.randn(3, 4), -torch.rand(3), torch.ones(3, dtype=torch.bool), vectors=torch.randn(3, 4))


def late_masks(adds, seed):
    """A fresh random late mask per add (shaped like its logp), about a quarter of it zero."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(a["logp"].shape, generator=g) >= 0.25 for a in adds]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("sketch_dim", [None, 5])
@pytest.mark.parametrize("use_vectors", [False, True], ids=["hidden", "vectors"])
@pytest.mark.parametrize("form", ["per_add", "flat", "rows"])
def test_late_mask_equals_one_call_with_the_combined_mask(backend, sketch_dim, use_vectors, form):
    """finalize(advantages, mask=late): the coefficients of one delta_coefficients call whose mask
    is the add masks AND the late mask (TRL's tool_mask arrives after the old-log-prob pass)."""
    shapes = [(2, 4), (3, 4), (1, 4)]
    dtype = dtype_of(backend)
    adds, flat = make_adds(shapes, seed=21, dtype=dtype)
    late = late_masks(adds, seed=22)
    kw = dict(k=2, sketch_dim=sketch_dim, seed=3, backend=backend)
    vectors = [dk.token_sketch(a["hidden"], a["logp"], sketch_dim=sketch_dim, seed=3, backend="torch")
               for a in adds] if use_vectors else None
    combined = flat["mask"] & torch.cat([m.reshape(-1) for m in late])
    assert bool((combined != flat["mask"]).any())  # the late mask removes tokens the add masks kept
    src = dict(vectors=torch.cat([v.reshape(-1, v.shape[-1]) for v in vectors])) if use_vectors \
        else dict(hidden=flat["hidden"])
    one = dk.delta_coefficients(src.get("hidden"), flat["logp"], flat["advantages"], combined,
                                vectors=src.get("vectors"), **kw)
    given = {"per_add": [m.to(torch.float32) for m in late], "flat": torch.cat([m.reshape(-1) for m in late]),
             "rows": torch.cat(late).to(torch.int64)}[form]
    acc = dk.DeltaAccumulator(**kw)
    for i, a in enumerate(adds):
        acc.add(**(dict(vectors=vectors[i]) if use_vectors else dict(hidden=a["hidden"])), logp=a["logp"],
                mask=a["mask"])
    res = acc.finalize([a["advantages"] for a in adds], mask=given)
    tol = 1e-10 if dtype == torch.float64 else TOL[torch.float32]
    assert_rel(torch.cat([r.coef.reshape(-1) for r in res]), one.coef, tol, "coef")
    assert_rel(torch.cat([r.weighted_advantages.reshape(-1) for r in res]), one.weighted_advantages, tol, "weighted")
    assert_rel(torch.cat([r.stats.pred.reshape(-1) for r in res]), one.stats.pred, tol * 10, "pred")
    assert res[0].stats.n_valid.item() == combined.sum().item()
    assert all(bool((r.weighted_advantages[~m] == 0).all()) for r, m in zip(res, late))


def test_late_mask_errors():
    adds, _ = make_adds([(2, 3), (4,)], seed=5)
    late = late_masks(adds, seed=6)
    acc = dk.DeltaAccumulator(backend="torch")
    for a in adds:
        acc.add(a["hidden"], a["logp"], a["mask"])
    adv = [a["advantages"] for a in adds]
    with pytest.raises(ValueError, match="mask: 1 tensors for 2 adds"):
        acc.finalize(adv, mask=late[:1])
    with pytest.raises(ValueError, match=r"add 1: mask: shape \[3\] does not match logp's \[4\]"):
        acc.finalize(adv, mask=[late[0], late[1][:3]])
    with pytest.raises(ValueError, match=r"add 0: mask: values must be 0 or 1"):
        acc.finalize(adv, mask=[late[0] * 2.0, late[1]])
    with pytest.raises(ValueError, match=r"mask: shape \[9\]: expected one tensor per add, or \[10\] \(all tokens\)$"):
        acc.finalize(adv, mask=torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="add 1: mask: a meta tensor holds no data"):  # the input gate
        acc.finalize(adv, mask=[late[0], late[1].to("meta")])
    assert len(acc.finalize(adv, mask=late)) == 2  # the refused calls left it usable
    rows = dk.DeltaAccumulator(backend="torch")
    rows.add(adds[0]["hidden"], adds[0]["logp"], adds[0]["mask"])
    with pytest.raises(ValueError, match=r"mask: shape \[3\]: .* or \[2, T\]$"):
        rows.finalize(adds[0]["advantages"], mask=torch.ones(3, dtype=torch.bool))
    early = dk.DeltaAccumulator(backend="torch")
    early.add(adds[0]["hidden"], adds[0]["logp"], adds[0]["mask"], advantages=adds[0]["advantages"])
    with pytest.raises(ValueError, match="mask: a late mask needs the advantages at finalize"):
        early.finalize(mask=late[:1])


@pytest.mark.parametrize("backend", cpu_backend_params())  # the registry's, on CPU tensors here
@pytest.mark.parametrize("early", [False, True])
def test_padding_is_dont_care(backend, early):
    """NaN/inf hidden states, positive log-probs and NaN advantages at masked positions are
    accepted (value checks on) and change no bit of the results."""
    adds, _ = make_adds([(3, 5), (7,), (2, 4)], seed=11)
    dirty = []
    for a in adds:
        pad = ~a["mask"]
        h, logp, adv = a["hidden"].clone(), a["logp"].clone(), a["advantages"].clone()
        h[pad] = float("nan")
        h[pad.nonzero()[:1].unbind(-1)] = float("inf")
        logp[pad] = 4.0
        if adv.shape == logp.shape:
            adv[pad] = float("nan")
        dirty.append(dict(a, hidden=h, logp=logp, advantages=adv))
    clean = accumulate(adds, early=early, k=2, backend=backend)
    got = accumulate(dirty, early=early, k=2, backend=backend)
    for c, g in zip(clean, got):
        assert torch.equal(c.coef, g.coef) and torch.equal(c.weighted_advantages, g.weighted_advantages)
    assert torch.equal(clean[0].stats.mu_pos, got[0].stats.mu_pos)
