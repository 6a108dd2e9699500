"""Optional dependencies of the integrations (stand-in for the package-wide helper)."""
from __future__ import annotations

import importlib


def require(module: str, extra: str):
    """Import ``module`` or raise ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"delta_kernels.integrations.{extra} needs {module!r}: "
                          f"pip install 'delta-kernels[{extra}]'") from e
