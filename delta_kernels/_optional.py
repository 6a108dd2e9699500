"""Optional dependencies: a missing one fails with one line that names the extra to install.

The extras are declared in pyproject.toml ([project.optional-dependencies]); the core package
needs only torch and numpy. Use ``require`` at the point where an optional module is first
needed::

    transformers = require("transformers", "trainer")
"""
from __future__ import annotations

import importlib
from types import ModuleType

# verl 0.9.1's own dependency pins (transformers < 5.11, a GPU stack) conflict with the rest, so
# its extra lists only what its algorithm modules import, and verl is installed without its pins.
_AFTER = {"verl": " && pip install --no-deps 'verl==0.9.1'"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def install_hint(extra: str) -> str:
    """The command that installs ``extra``, e.g. ``pip install 'delta-kernels[trainer]'``."""
    return f"pip install 'delta-kernels[{extra}]'" + _AFTER.get(extra, "")


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (dotted names allowed) or raise MissingExtra naming ``extra``.

    Only a missing top-level package becomes MissingExtra; a package that is installed but
    fails to import raises its own error, which says more."""
    top = module.split(".")[0]
    try:
        importlib.import_module(top)
    except ModuleNotFoundError as e:
        if e.name != top:
            raise
        raise MissingExtra(f"{top} is not installed; it comes with the '{extra}' extra: "
                           f"{install_hint(extra)}") from None
    return importlib.import_module(module)
