"""The ``delta=`` options shared by the TRL and verl integrations."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from .. import _checks as C
from ..accumulator import DeltaAccumulator
from ..head_sketch import check_width, head_gradient_sketch

VECTORS = ("hidden", "head")


@dataclass(frozen=True)
class DeltaSpec(C.DeltaConfig):
    """The ``delta=`` options: k, lam_min, lam_max, eps (validated as ``delta_coefficients``
    does) plus sketch_dim, seed and backend, all with ``delta_coefficients``' meaning, and
    ``vectors``: "hidden" (v = (1 - p) h) or "head" (the whole LM-head gradient's factors from
    ``head_gradient_sketch``: sketch_dim is then r2, ``vocab_sketch_dim`` r1)."""
    sketch_dim: Optional[int] = None
    seed: int = 0
    backend: str = "auto"
    vectors: str = "hidden"
    vocab_sketch_dim: Optional[int] = None

    def __post_init__(self):  # refuse bad options when the trainer is built, not at its first step
        super().__post_init__()
        C.check_sketch_args(self.sketch_dim, self.seed)
        if self.vectors not in VECTORS:
            C.fail("vectors", f"expected one of {', '.join(VECTORS)}, got {self.vectors!r}")
        check_width("vocab_sketch_dim", self.vocab_sketch_dim)
        if self.vocab_sketch_dim is not None and self.vectors != "head":
            C.fail("vocab_sketch_dim", "goes with vectors='head'")

    @classmethod
    def parse(cls, delta) -> Optional["DeltaSpec"]:
        """None (or ``k`` None) -> None (DelTA off); a dict or DeltaSpec -> DeltaSpec."""
        if delta is None or isinstance(delta, cls):
            return delta
        if not isinstance(delta, dict):
            raise TypeError(f"delta: expected a dict such as dict(k=1, lam_min=0.8, lam_max=1.2), got "
                            f"{type(delta).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(delta) - names)
        if unknown:
            raise ValueError(f"delta: unknown keys {unknown}; allowed: {sorted(names)}")
        if "k" in delta and delta["k"] is None:
            return None
        return cls(**delta)

    def kwargs(self) -> dict:
        """Every option, as keywords of ``DeltaSpec`` (what travels to verl's workers)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def coefficient_kwargs(self) -> dict:
        """The options as keywords of ``delta_coefficients`` / ``DeltaAccumulator`` (with head
        vectors the sketch widths belong to head_gradient_sketch, not to the coefficients)."""
        kw = self.kwargs()
        del kw["vectors"], kw["vocab_sketch_dim"]
        if self.vectors == "head":
            kw["sketch_dim"] = None
        return kw

    def accumulator(self, process_group=None) -> DeltaAccumulator:
        """A ``DeltaAccumulator`` with these options (store "auto": z only when sketched, else the
        hidden states by reference on the CPU, host memory beyond a quarter of a GPU's)."""
        return DeltaAccumulator(**self.coefficient_kwargs(), process_group=process_group)

    def head_factors(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     targets: torch.Tensor, temperature: float):
        """vectors="head": (u, s) of head_gradient_sketch for these response tokens."""
        return head_gradient_sketch(hidden, weight.to(hidden.dtype), targets, vocab_sketch_dim=self.vocab_sketch_dim,
                                    sketch_dim=self.sketch_dim, seed=self.seed, temperature=float(temperature),
                                    bias=None if bias is None else bias.to(hidden.dtype),
                                    backend=_lm_head_backend(self.backend))


def _lm_head_backend(backend: str) -> str:
    """The LM-head backend for a coefficient backend: the one named when it has the LM-head op, else "auto"."""
    from .._backends import lm_head_backends
    return backend if backend in lm_head_backends() else "auto"
