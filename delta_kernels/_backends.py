"""The backend registry: one declaration per backend, and the selection every public call uses.

A backend is a module of internal functions on validated, flat inputs (see reference/ for the
contract): ``token_sketch``, ``delta_coefficients``, ``clipped_surrogate_loss`` and
``PIPELINE_KERNELS`` (a pipeline.PassKernels: the passes DeltaAccumulator drives), optionally ``fipo_weights``
(CREDIT_OPS), and optionally a second module with
the fused LM-head functions ``logprob``, ``token_vectors``, ``logprob_backward`` and ``softmax_sketch``. Backends
never call each other. docs/backends.md says how to add one.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import torch

PHASES = ("token_sketch", "delta_coefficients", "clipped_surrogate_loss", "PIPELINE_KERNELS")
LM_HEAD = "lm_head"  # the op name of the fused LM-head functions
CREDIT_OPS = ("fipo_weights",)  # the in-loss credit kernels (delta_kernels.credit)
LM_HEAD_FUNCTIONS = ("logprob", "token_vectors", "logprob_backward", "softmax_sketch")
ANY = "any"  # in devices: tensors of any device that holds data (plain torch ops); never meta
_FAST = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Backend:
    """One backend's declaration.

    name: what ``backend=`` takes. module: dotted path of the module with the ``ops`` in PHASES.
    devices: tensor device types it takes (ANY: every device but meta). dtypes: input compute
    dtypes it takes (float64 only on a backend that computes in float64). ops: what it
    implements (names from PHASES, and LM_HEAD when ``lm_head`` names the fused LM-head
    module). priority: ``auto`` takes the highest that runs on the call's device and dtype and
    implements the op. interpreted: also runs on CPU tensors when TRITON_INTERPRET=1 (tests
    only: ``auto`` never picks the interpreter). strided_rows: its passes read the row operands
    (hidden, vectors) as the caller's [B, T, D] view in place (last dim contiguous, row n = b T + t
    at b stride_b + t stride_t); the others get a contiguous [N, D] copy (_checks.rows_for).
    """

    name: str
    module: str
    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    ops: Tuple[str, ...]
    priority: int
    lm_head: Optional[str] = None
    interpreted: bool = False
    strided_rows: bool = False

    def __post_init__(self):
        unknown = set(self.ops) - set(PHASES + (LM_HEAD,) + CREDIT_OPS)
        if unknown:
            raise ValueError(f"backend: {self.name!r} declares unknown ops {sorted(unknown)}")
        if (self.lm_head is None) == (LM_HEAD in self.ops):
            raise ValueError(f"backend: {self.name!r}: {LM_HEAD!r} in ops and an lm_head module go together")

    def takes(self, device: torch.device) -> bool:
        """Whether its declared devices include ``device`` (what ``auto`` asks)."""
        return device.type != "meta" and (device.type in self.devices or ANY in self.devices)

    def runs_on(self, device: torch.device) -> bool:
        """Whether it takes tensors on ``device``, the interpreter included (a named backend)."""
        return self.takes(device) or (self.interpreted and device.type == "cpu"
                                      and os.environ.get("TRITON_INTERPRET") == "1")

    def device_text(self) -> str:
        text = " or ".join("any device's" if d == ANY else d.upper() for d in self.devices) + " tensors"
        return text + (", or CPU tensors under TRITON_INTERPRET=1" if self.interpreted else "")


_REGISTRY: Dict[str, Backend] = {}
_errors: Dict[str, str] = {}


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend; it takes part in ``resolve``, ``auto`` and the test suites."""
    if backend.name == "auto":
        raise ValueError("backend: 'auto' is reserved")
    _REGISTRY[backend.name] = backend
    _errors.pop(backend.name, None)
    return backend


def registered() -> List[Backend]:
    """Every declared backend, built or not, lowest priority first (auto tries them in reverse)."""
    return sorted(_REGISTRY.values(), key=lambda b: b.priority)


def lm_head_backends() -> Tuple[str, ...]:
    """The declared backends with the fused LM-head op."""
    return tuple(b.name for b in registered() if LM_HEAD in b.ops)


def names() -> Tuple[str, ...]:
    """What ``backend=`` accepts: "auto" and every declared name."""
    return ("auto",) + tuple(b.name for b in registered())


register(Backend("triton", "delta_kernels.triton", ("cuda",), _FAST, PHASES + (LM_HEAD,) + CREDIT_OPS, 30,
                 lm_head="delta_kernels.fused_linear.triton_ops", interpreted=True, strided_rows=True))
register(Backend("cuda", "delta_kernels.backends.cuda", ("cuda",), _FAST, PHASES, 20, strided_rows=True))
register(Backend("cpp", "delta_kernels.backends.cpp", ("cpu",), _FAST, PHASES + CREDIT_OPS, 10, strided_rows=True))
register(Backend("torch", "delta_kernels.reference", (ANY,), _FAST + (torch.float64,), PHASES + (LM_HEAD,) + CREDIT_OPS,
                 0, lm_head="delta_kernels.fused_linear.torch_chunked"))


class _Imported:
    """The backend modules imported so far, as attributes named by the dotted path with "." as
    "__" (an attribute, not a dict: torch.compile reads it live after a trace-time import)."""


_imported_modules = _Imported()


def _attr(path: str) -> str:
    return path.replace(".", "__")


@torch.compiler.assume_constant_result
def _imported(b: Backend, path: str) -> bool:
    """Import ``path`` once; False when it does not import. Under torch.compile the import runs
    at trace time and the answer is a constant (no import inside the graph), so a compiled call
    can be the first call of a process."""
    if not hasattr(_imported_modules, _attr(path)):
        try:
            setattr(_imported_modules, _attr(path), importlib.import_module(path))
        except ImportError as e:  # not built, or triton missing
            _errors[b.name] = f"{type(e).__name__}: {e}"
            return False
    return True


def _load(b: Backend, op: str) -> Optional[ModuleType]:
    path = b.lm_head if op == LM_HEAD else b.module
    return getattr(_imported_modules, _attr(path)) if _imported(b, path) else None


def _serves(mod: ModuleType, op: str) -> bool:
    return all(hasattr(mod, f) for f in LM_HEAD_FUNCTIONS) if op == LM_HEAD else hasattr(mod, op)


RUNS_HERE = "runs here"


def _device_present(device_type: str) -> bool:
    if device_type in ("cpu", ANY):
        return True
    mod = getattr(torch, device_type, None)
    return bool(mod is not None and hasattr(mod, "is_available") and mod.is_available())


def _why_not_here(b: Backend) -> str:
    why = []
    if _load(b, PHASES[0]) is None:
        why.append(f"no module ({_errors.get(b.name)})")
    if not any(_device_present(d) for d in b.devices):
        lacking = "no GPU" if "cuda" in b.devices else f"no {'/'.join(b.devices)} device"
        if b.interpreted and os.environ.get("TRITON_INTERPRET") == "1":
            why.append(f"interpreter only ({lacking}: CPU tensors run under TRITON_INTERPRET=1, slowly, for tests)")
        else:
            why.append(f"{lacking} (it takes {b.device_text()})")
    return "; ".join(why)


def backend_report() -> Dict[str, str]:
    """Every declared backend -> RUNS_HERE ("runs here"), or why it cannot run on this machine:
    "no module (...)" (not built, or its package not installed), "no GPU (...)" (it takes CUDA
    tensors and torch sees no CUDA device), "interpreter only (...)" (no GPU, but CPU tensors run
    under TRITON_INTERPRET=1: slow, for tests; ``auto`` never picks it). Several reasons are joined
    with "; ". delta-train's banner and --backend errors use these words."""
    return {b.name: _why_not_here(b) or RUNS_HERE for b in registered()}


def describe_backends() -> str:
    """backend_report() in one line, "runs here: torch, cpp; cuda: no GPU (...)" (delta-train's banner)."""
    report = backend_report()
    here = ", ".join(name for name, why in report.items() if why == RUNS_HERE)
    return "; ".join([f"{RUNS_HERE}: {here}"] + [f"{name}: {why}" for name, why in report.items() if why != RUNS_HERE])


def available_backends(all: bool = False) -> List[str]:  # noqa: A002  (the public keyword)
    """Names of the declared backends that run on this machine: the module imports and a device
    they take is present (the Triton interpreter does not count). ``all=True``: every declared
    backend whose module imports (what is installed), whether or not it can run here;
    ``backend_report()`` says why each one that is not listed cannot run."""
    if all:
        return [b.name for b in registered() if _load(b, PHASES[0]) is not None]
    return [name for name, why in backend_report().items() if why == RUNS_HERE]


def reads_strided_rows(impl: ModuleType) -> bool:
    """Whether the backend whose module is ``impl`` (what ``resolve`` returned) declares strided_rows."""
    return any(b.strided_rows for b in _REGISTRY.values() if b.module == impl.__name__)


def resolve(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> ModuleType:
    """The module that serves ``op`` (a name from PHASES, or LM_HEAD) for a call on ``device``
    with compute dtype ``dtype``. ``auto`` takes the highest-priority declared backend whose
    devices include ``device`` (the interpreter does not count; meta tensors hold no data and
    none takes them), whose dtypes include ``dtype``
    and that implements ``op`` and imports; a named backend that cannot serve the call raises,
    naming why (never a silent fallback)."""
    if backend not in _REGISTRY:
        if backend != "auto":
            raise ValueError(f"backend: unknown backend {backend!r}; expected one of {', '.join(names())}")
        for b in reversed(registered()):
            if b.takes(device) and dtype in b.dtypes and op in b.ops:
                mod = _load(b, op)
                if mod is not None and _serves(mod, op):
                    return mod
        raise ValueError(f"backend: no backend runs {op} on {device.type} tensors of {dtype}")
    b = _REGISTRY[backend]
    if op == LM_HEAD and op not in b.ops:  # the fused calls know only the backends that have the op
        raise ValueError(f"backend: unknown backend {backend!r} for the fused LM head; expected one of "
                         f"{', '.join(('auto',) + lm_head_backends())}")
    if not b.runs_on(device):
        raise ValueError(f"backend: {backend!r} does not run on {device.type} tensors ({b.device_text()})")
    if dtype not in b.dtypes:
        takes = "/".join(str(d).replace("torch.", "") for d in b.dtypes)
        if dtype == torch.float64:
            raise TypeError(f"backend: {backend!r} computes in float32 and takes {takes} inputs; "
                            "use backend='torch' for float64")
        raise TypeError(f"backend: {backend!r} takes {takes} inputs, not {dtype}")
    if op not in b.ops:
        raise NotImplementedError(f"backend: {backend!r} does not implement {op}")
    mod = _load(b, op)
    if mod is None:
        raise RuntimeError(f"backend: {backend!r} cannot run here: no module ({_errors.get(backend)})")
    if not _serves(mod, op):
        raise NotImplementedError(f"backend: {backend!r} does not implement {op}")
    return mod
