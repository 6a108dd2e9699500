"""The ``delta=`` options shared by the TRL and verl integrations."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from .. import _checks as C
from ..accumulator import DeltaAccumulator


@dataclass(frozen=True)
class DeltaSpec(C.DeltaConfig):
    """The ``delta=`` options: k, lam_min, lam_max, eps (validated as ``delta_coefficients``
    does) plus sketch_dim, seed and backend, all with ``delta_coefficients``' meaning."""
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
        """The options as keywords of ``delta_coefficients`` / ``DeltaAccumulator``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def accumulator(self, process_group=None) -> DeltaAccumulator:
        """A ``DeltaAccumulator`` with these options (store "auto": z only when sketched, else the
        hidden states by reference on the CPU, host memory beyond a quarter of a GPU's)."""
        return DeltaAccumulator(**self.kwargs(), process_group=process_group)
