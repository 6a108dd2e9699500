"""The credit-method registry: what a method declares, and composition by explicit product.

A method turns one batch into per-token weights that multiply the advantages of the clipped
surrogate (and, optionally, a per-row ``keep`` that drops whole sequences from the loss and its
normalisers). Two kinds:

    BEFORE_UPDATE  computed once per batch, before the update, from rollout-time inputs
                   (DelTA: the token vectors of the old-log-prob pass); the weights do not
                   depend on the parameters being trained.
    IN_LOSS        recomputed at every loss call from the current policy's log-probs or
                   entropies (FIPO, high-entropy tokens); detached, but they change with theta.

A spec names one method ("fipo") or a product of several ("delta*entropy"); "none" is the empty
product (weights 1). Nothing is composed unless the spec says so. docs/design.md has the recipe
for adding a method: one module in this package that calls ``register``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, Optional, Tuple

import torch

from .._checks import fail

BEFORE_UPDATE = "before_update"
IN_LOSS = "in_loss"
NONE = "none"
INPUTS = ("logp", "old_logp", "advantages", "mask", "entropy", "hidden", "vectors", "side_sums")


@dataclass
class CreditInputs:
    """What a method may read, shaped [B, T] unless noted (mask bool). Which ones a method
    needs is its ``inputs``; the others may be None. logp is the current policy's (detached)
    for IN_LOSS methods and the rollout's for BEFORE_UPDATE ones."""
    mask: torch.Tensor
    advantages: torch.Tensor              # [B, T] or [B]
    logp: Optional[torch.Tensor] = None
    old_logp: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None     # [B, T, H]
    vectors: Optional[torch.Tensor] = None    # [B, T, D] token vectors or their sketch
    side_sums: Optional[torch.Tensor] = None  # [2, D]
    clip_c: float = 10.0                      # the surrogate's dual-clip bound
    process_group: object = None
    backend: str = "auto"


@dataclass
class CreditWeights:
    """weights [B, T] (None: 1) multiply the advantages; keep [B] bool (None: every row) is
    and-ed into the mask; metrics are 0-dim tensors named "<method>/<metric>"."""
    weights: Optional[torch.Tensor] = None
    keep: Optional[torch.Tensor] = None
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class CreditMethod:
    """One method's declaration.

    name: its name in specs (letters, digits, underscores). kind: BEFORE_UPDATE or IN_LOSS.
    inputs: names from INPUTS it reads. depends_on_theta: whether its weights change with the
    trained parameters (then it must run inside every loss call). metrics: the metric names
    its ``compute`` returns (without the "<name>/" prefix). options: a frozen dataclass whose
    fields (with defaults and their own checks) are the method's options; the trainer makes a
    flag --<name>-<field> of each. compute(inputs, options) -> CreditWeights.
    fused_config(options, clip_c): for an in-loss method that a backend's surrogate computes in
    its own call (see fused_in_loss), the parameters that call takes; None: no backend fuses it.
    """
    name: str
    kind: str
    inputs: Tuple[str, ...]
    depends_on_theta: bool
    metrics: Tuple[str, ...]
    options: type
    compute: Callable[[CreditInputs, object], CreditWeights]
    summary: str = ""
    fused_config: Optional[Callable[[object, float], object]] = None

    def __post_init__(self):
        if not self.name.isidentifier() or self.name == NONE:
            raise ValueError(f"credit: method name {self.name!r} must be an identifier other than {NONE!r}")
        if self.kind not in (BEFORE_UPDATE, IN_LOSS):
            raise ValueError(f"credit: {self.name!r} has kind {self.kind!r}; expected {BEFORE_UPDATE} or {IN_LOSS}")
        unknown = set(self.inputs) - set(INPUTS)
        if unknown:
            raise ValueError(f"credit: {self.name!r} declares unknown inputs {sorted(unknown)}")
        if self.depends_on_theta != (self.kind == IN_LOSS):
            raise ValueError(f"credit: {self.name!r}: weights that depend on theta are computed in the loss")


_REGISTRY: Dict[str, CreditMethod] = {}


def register(method: CreditMethod) -> CreditMethod:
    """Add a method; it is then accepted by every spec (losses, trainer, adapters)."""
    _REGISTRY[method.name] = method
    _fused_cached.cache_clear()
    return method


def methods() -> Tuple[str, ...]:
    """The registered method names, sorted."""
    return tuple(sorted(_REGISTRY))


def method(name: str) -> CreditMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        fail("credit", f"unknown credit method {name!r}; expected one of {', '.join(methods())}, "
                       f"{NONE!r}, or a product such as 'delta*entropy'")


@dataclass(frozen=True)
class CreditSpec:
    """A parsed spec: the methods of the product, in order, and each one's options."""
    methods: Tuple[CreditMethod, ...]
    options: Tuple[object, ...]

    @property
    def name(self) -> str:
        return "*".join(m.name for m in self.methods) or NONE

    def of_kind(self, kind: str) -> "CreditSpec":
        keep = [(m, o) for m, o in zip(self.methods, self.options) if m.kind == kind]
        return CreditSpec(tuple(m for m, _ in keep), tuple(o for _, o in keep))

    def option(self, name: str):
        """The options of method ``name`` in this spec."""
        for m, o in zip(self.methods, self.options):
            if m.name == name:
                return o
        fail("credit", f"{name!r} is not part of the spec {self.name!r}")


def credit_spec(spec, **options) -> CreditSpec:
    """Parse ``spec`` ("none", "fipo", "delta*entropy", or a CreditSpec, returned as is) with
    options per method: ``credit_spec("fipo", fipo=dict(decay_rate=64))`` (a dict of fields, or
    the method's options instance). Options for a method not in the spec are refused."""
    if isinstance(spec, CreditSpec):
        if options:
            fail("credit", "options go with a spec string, not with a parsed CreditSpec")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"credit: expected a spec string or a CreditSpec, got {type(spec).__name__}")
    names = [] if spec.strip() == NONE else [p.strip() for p in spec.split("*")]
    if any(not n for n in names):
        fail("credit", f"malformed spec {spec!r}; expected 'none', a method, or methods joined by '*'")
    if len(set(names)) != len(names):
        fail("credit", f"spec {spec!r} names a method twice")
    chosen = tuple(method(n) for n in names)
    extra = set(options) - set(names)
    if extra:
        fail("credit", f"options given for {sorted(extra)}, which spec {spec!r} does not use")
    opts = []
    for m in chosen:
        given = options.get(m.name)
        if isinstance(given, m.options):
            opts.append(given)
        elif not given:
            opts.append(m.options())
        else:
            known = {f.name for f in fields(m.options)}
            bad = set(given) - known
            if bad:
                fail(f"{m.name} options", f"unknown {sorted(bad)}; expected some of {sorted(known)}")
            opts.append(m.options(**given))
    return CreditSpec(chosen, tuple(opts))


def credit_weights(spec: CreditSpec, inputs: CreditInputs) -> CreditWeights:
    """The product of the spec's methods on ``inputs``: weights multiply, keeps are and-ed,
    metrics are merged (prefixed with each method's name)."""
    out = CreditWeights()
    for m, o in zip(spec.methods, spec.options):
        missing = [n for n in m.inputs if getattr(inputs, n) is None]
        if missing:
            fail(missing[0], f"credit method {m.name!r} needs {', '.join(missing)}")
        part = m.compute(inputs, o)
        if part.weights is not None:
            out.weights = part.weights if out.weights is None else out.weights * part.weights
        if part.keep is not None:
            out.keep = part.keep if out.keep is None else out.keep & part.keep
        out.metrics.update({f"{m.name}/{k}": v for k, v in part.metrics.items()})
    return out


FUSED_CREDIT = "fused_credit"  # attribute of a backend's clipped_surrogate_loss: the methods it fuses


def fused_in_loss(credit, loss_fn, logp: torch.Tensor, clip_c: float):
    """(method, its fused_config) when ``credit`` is exactly one in-loss method whose weights the
    backend's surrogate ``loss_fn`` computes in the same call (its FUSED_CREDIT attribute names
    them; it is then called with ``credit=`` that config and returns (loss, metrics, the
    method's metrics)); else None: in_loss_credit's path. [B, T] inputs only."""
    if credit is None or logp.dim() != 2:
        return None
    if torch.compiler.is_compiling() or not isinstance(credit, (str, CreditSpec)):  # traced as it is (dynamo
        return _fused(credit, loss_fn, clip_c)  # does not keep an lru_cache); a wrong type: credit_spec's error
    return _fused_cached(credit, loss_fn, clip_c)


def _fused(credit, loss_fn, clip_c: float):
    spec = credit_spec(credit)
    if len(spec.methods) != 1 or spec.methods[0].name not in getattr(loss_fn, FUSED_CREDIT, ()):
        return None
    m = spec.methods[0]
    return m, m.fused_config(spec.options[0], clip_c)


# eager: a spec (a string or a CreditSpec, both hashable) is parsed and its options checked once, not at
# every loss call (~50 us on the dev machine, 3% of a surrogate step at N = 32k); register() clears it
_fused_cached = functools.lru_cache(maxsize=256)(_fused)


def in_loss_credit(credit, logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor,
                   coef: Optional[torch.Tensor], entropy: Optional[torch.Tensor], clip_c: float, process_group,
                   backend: str):
    """A loss call's credit: -> (valid [B, T] bool with dropped rows removed, coef (the given
    coef times the spec's weights, or None), metrics). Only IN_LOSS methods run in a loss:
    a BEFORE_UPDATE method is computed once per batch and passed as ``coef``. None: no credit."""
    if credit is None:
        return valid, coef, {}
    spec = credit_spec(credit)
    before = spec.of_kind(BEFORE_UPDATE)
    if before.methods:
        fail("credit", f"{before.name!r} is computed before the update: pass its weights as coef= "
                       "(e.g. delta_coefficients(...).coef) and only in-loss methods in credit=")
    if not spec.methods:
        return valid, coef, {}
    if logp.dim() != 2:
        fail("credit", f"in-loss credit needs [B, T] inputs, got shape {list(logp.shape)}")
    inputs = CreditInputs(mask=valid, advantages=adv, logp=logp.detach(), old_logp=old_logp, entropy=entropy,
                          clip_c=clip_c, process_group=process_group, backend=backend)
    cw = credit_weights(spec, inputs)
    if cw.keep is not None:
        valid = valid & cw.keep[:, None]
    if cw.weights is not None:
        coef = cw.weights if coef is None else coef * cw.weights
    return valid, coef, cw.metrics
