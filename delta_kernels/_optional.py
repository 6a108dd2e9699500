"""Optional dependencies: a missing one fails with one line that names the extra to install.

The extras are declared in pyproject.toml ([project.optional-dependencies]); the core package
needs only torch and numpy. Use ``require`` at the point where an optional module is first
needed::

    transformers = require("transformers", "trainer")

The hint names what works from a clone, ``pip install '.[trainer]'``, until the package is published.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# verl 0.9.1's and OpenRLHF 0.11.2's own dependency pins (transformers < 5.11 / == 5.15, a GPU stack) conflict
# with the rest, so their extras list only what their modules import, and they are installed without their pins.
_AFTER = {"verl": " && pip install --no-deps 'verl==0.9.1'",
          "openrlhf": " && pip install --no-deps 'openrlhf==0.11.2'"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def install_hint(extra: str) -> str:
    """The command that installs ``extra`` from a clone of the repository (the package is not on
    PyPI yet), e.g. ``pip install '.[trainer]' (in the delta-kernels clone)``."""
    return f"pip install '.[{extra}]'" + _AFTER.get(extra, "") + " (in the delta-kernels clone)"


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (dotted names allowed) or raise MissingExtra naming ``extra``: when its
    top-level package is missing, or installed without one of its own dependencies (as verl is,
    installed with --no-deps). Other import errors, such as a submodule missing from another
    version of the package, propagate as they are."""
    top = module.split(".")[0]
    try:
        importlib.import_module(top)
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if not missing or (missing == top and e.name != top):
            raise
        what = f"{top} is not installed" if missing == top else f"{top} needs {missing}, which is not installed"
        raise MissingExtra(f"{what}; it comes with the '{extra}' extra: {install_hint(extra)}") from None
