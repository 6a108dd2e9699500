"""Token-credit methods as one registry (delta_kernels.credit.registry): DelTA before the update,
FIPO and high-entropy tokens in the loss, composed by explicit product ("delta*entropy").

Every module of this package is imported here, so a new method is one new module that calls
``register`` (docs/design.md, "How to add a credit method").
"""
import importlib
import pkgutil

from .registry import (BEFORE_UPDATE, IN_LOSS, NONE, CreditInputs, CreditMethod, CreditSpec, CreditWeights,
                       credit_spec, credit_weights, method, methods, register)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")

from .entropy import entropy_mask  # noqa: E402
from .fipo import FipoWeights, fipo_weights  # noqa: E402

__all__ = ["BEFORE_UPDATE", "IN_LOSS", "NONE", "CreditInputs", "CreditMethod", "CreditSpec", "CreditWeights",
           "credit_spec", "credit_weights", "method", "methods", "register", "entropy_mask", "fipo_weights",
           "FipoWeights"]
