"""DelTA (before the update): the coefficients of delta_kernels.delta_coefficients, computed once
per batch from the rollout-time token vectors (or hidden states) and the advantages."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from .. import _checks as C
from ..coefficients import delta_coefficients
from .registry import BEFORE_UPDATE, CreditInputs, CreditMethod, CreditWeights, register


@dataclass(frozen=True)
class DeltaOptions:
    """DelTA's options (delta_coefficients' keywords)."""
    k: int = 1
    lam_min: float = 0.8
    lam_max: float = 1.2
    sketch_dim: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        C.DeltaConfig(k=self.k, lam_min=self.lam_min, lam_max=self.lam_max)
        C.check_sketch_args(self.sketch_dim, self.seed)


def _compute(inputs: CreditInputs, options: DeltaOptions) -> CreditWeights:
    """From inputs.hidden, or inputs.vectors (and side_sums) of the old-log-prob pass."""
    res = delta_coefficients(inputs.hidden, inputs.logp, inputs.advantages, inputs.mask, vectors=inputs.vectors,
                             side_sums=inputs.side_sums, process_group=inputs.process_group, backend=inputs.backend,
                             **asdict(options))
    valid = inputs.mask.bool()
    c = res.coef[valid]
    metrics = dict(coef_min=c.min() if c.numel() else res.coef.sum(), coef_max=c.max() if c.numel() else res.coef.sum(),
                   n_pos=res.stats.n_pos, n_neg=res.stats.n_neg)
    return CreditWeights(weights=res.coef, metrics=metrics)


METHOD = register(CreditMethod(
    name="delta", kind=BEFORE_UPDATE, inputs=("logp", "advantages", "mask"), depends_on_theta=False,
    metrics=("coef_min", "coef_max", "n_pos", "n_neg"), options=DeltaOptions, compute=_compute,
    summary="DelTA coefficients from the rollout's token vectors (hidden or vectors, once per batch)"))
