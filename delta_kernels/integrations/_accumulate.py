"""Stand-in for issue 11's ``DeltaAccumulator`` (the only place the integrations accumulate).

Keeps one [b, T, D] tensor per ``add`` (the sketch z when ``sketch_dim`` is set, else the hidden
states themselves) and calls ``delta_coefficients`` once on their concatenation, so the numbers
are those of one call over the whole batch. When ``DeltaAccumulator`` lands, this class becomes
``DeltaAccumulator(**spec.kwargs(), process_group=...)`` with ``add``/``finalize`` unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional

import torch

from .. import _checks as C
from ..coefficients import DeltaResult, delta_coefficients
from ..sketch import token_sketch


@dataclass(frozen=True)
class DeltaSpec(C.DeltaConfig):
    """The ``delta=`` options of the integrations: k, lam_min, lam_max, eps (validated as
    ``delta_coefficients`` does) plus sketch_dim, seed and backend."""
    sketch_dim: Optional[int] = None
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self):  # refuse bad options when the trainer is built, not at its first step
        super().__post_init__()
        C.check_sketch_args(self.sketch_dim, self.seed)

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
        return {f.name: getattr(self, f.name) for f in fields(self)}


class TokenVectorBuffer:
    """Collects hidden states (or their sketches) and log-probs micro-batch by micro-batch.

    add(hidden [b, T, H], logp [b, T], mask [b, T]); every add has the same T.
    finalize(advantages [B] or [B, T]) -> DeltaResult over the concatenation (global over
    ``process_group`` when given).
    """

    def __init__(self, spec: DeltaSpec, process_group=None):
        self.spec, self.process_group = spec, process_group
        self._vectors: List[torch.Tensor] = []
        self._logp: List[torch.Tensor] = []
        self._mask: List[torch.Tensor] = []

    def add(self, hidden: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> None:
        if self.spec.sketch_dim is not None:  # sketch on the fly: keep [b, T, r], not [b, T, H]
            hidden = token_sketch(hidden, logp, sketch_dim=self.spec.sketch_dim, seed=self.spec.seed,
                                  backend=self.spec.backend)
        self._vectors.append(hidden)
        self._logp.append(logp)
        self._mask.append(mask)

    def __len__(self) -> int:
        return len(self._vectors)

    def finalize(self, advantages: torch.Tensor, mask: Optional[torch.Tensor] = None) -> DeltaResult:
        """mask: optional [B, T] replacing the masks of the adds (TRL's tool_mask arrives after the pass)."""
        if not self._vectors:
            raise RuntimeError("finalize: nothing was added (no captured forward)")
        vectors, logp, added_mask = (torch.cat(x) for x in (self._vectors, self._logp, self._mask))
        mask = added_mask if mask is None else mask
        self._vectors, self._logp, self._mask = [], [], []
        s = self.spec
        sketched = s.sketch_dim is not None
        return delta_coefficients(None if sketched else vectors, logp, advantages, mask.bool(), k=s.k,
                                  lam_min=s.lam_min, lam_max=s.lam_max, eps=s.eps, sketch_dim=s.sketch_dim, seed=s.seed,
                                  process_group=self.process_group, backend=s.backend,
                                  vectors=vectors if sketched else None)
