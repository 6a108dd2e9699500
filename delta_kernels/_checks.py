"""Argument checking, done once in Python before any backend runs.

Every public call validates here and hands backends flat, contiguous tensors, except the row
operands hidden/vectors, which a backend that declares strided_rows gets as the caller's view
(rows_for); kernels assume valid input. Errors name the argument and say what was expected.

Under torch.compile (docs/reliability.md, "Under torch.compile"): the checks of types, shapes,
dtypes, devices and scalar arguments run at trace time and raise the same errors; the value
checks (which read tensor values: finiteness, logp <= 0, mask values, ranges) read nothing, so
the graph does not break, unless ``COMPILE_VALUE_CHECKS`` (DELTA_KERNELS_COMPILE_VALUE_CHECKS=1)
turns each into a ``torch._assert_async`` in the graph (RuntimeError "name: what" when it fails).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

from ._backends import reads_strided_rows

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Under torch.compile: value checks as device asserts (True) or not made (False). Read at trace
# time (a change recompiles).
COMPILE_VALUE_CHECKS = os.environ.get("DELTA_KERNELS_COMPILE_VALUE_CHECKS") == "1"


def compiling() -> bool:
    """Whether torch.compile is tracing this call: value checks must not read values."""
    return torch.compiler.is_compiling()


def assert_on_device(ok: torch.Tensor, name: str, what: str) -> None:
    """A value check under torch.compile: ``ok`` (a bool tensor) asserted in the graph when
    COMPILE_VALUE_CHECKS, else nothing (no graph break either way)."""
    if COMPILE_VALUE_CHECKS:
        torch._assert_async(ok.all(), f"{name}: {what} (a value check under torch.compile)")


def fail(name: str, msg: str) -> None:
    raise ValueError(f"{name}: {msg}")


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def refuse_unreadable(name: str, x) -> None:
    """The gate in front of every kernel: x is a plain strided tensor whose memory can be read.

    Refused, naming the argument: tensor subclasses (a DTensor is told to call .full_tensor();
    nn.Parameter is a plain tensor and passes), meta tensors (no data: a native kernel would read
    whatever address the storage offset names), sparse/mkldnn layouts and nested tensors, and
    zero tensors (torch._efficientzerotensor: no storage behind the data pointer). Reads no
    values and copies nothing."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if type(x) not in (torch.Tensor, torch.nn.Parameter):
        dtensor = _dtensor_type()
        if dtensor is not None and isinstance(x, dtensor):
            raise TypeError(f"{name}: a DTensor (sharded over a device mesh) is not accepted; pass the local full "
                            f"tensor: {name}.full_tensor() (or gather it yourself)")
        raise TypeError(f"{name}: tensor subclass {type(x).__name__} is not accepted; pass a plain torch.Tensor")
    if x.device.type == "meta":
        fail(name, "a meta tensor holds no data; pass a tensor on cpu or cuda")
    if x.layout != torch.strided:
        raise TypeError(f"{name}: layout {x.layout} is not accepted; pass a dense tensor ({name}.to_dense())")
    if x.is_nested:
        raise TypeError(f"{name}: nested tensors are not accepted; pad them to a dense tensor")
    if not compiling() and x._is_zerotensor():  # not traceable: skipped under compile (docs/reliability.md)
        fail(name, "a zero tensor (torch._efficientzerotensor) has no storage; pass torch.zeros(...) instead")


def admit(name: str, x) -> torch.Tensor:
    """refuse_unreadable, then the negation/conjugation view bits resolved (the kernels read raw
    memory, which holds the values before the lazy negation; .contiguous() keeps the bit)."""
    refuse_unreadable(name, x)
    if compiling():  # not traceable: skipped under compile (docs/reliability.md)
        return x
    if x.is_conj():
        x = x.resolve_conj()
    if x.is_neg():
        x = x.resolve_neg()
    return x


def check_tensor(name: str, x, *, floating: bool = True) -> torch.Tensor:
    """-> x admitted (see admit); floating dtype unless floating=False."""
    x = admit(name, x)
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    return x


def _leading(valid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """valid (a bool tensor of x's leading dims) broadcast to x's shape."""
    return valid.reshape(*valid.shape, *([1] * (x.dim() - valid.dim()))).expand(x.shape)


def check_finite(name: str, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
    """Raise naming the first non-finite element; with ``valid`` (bool, x's leading dims) only
    valid positions are looked at (padding may hold anything). The common case is one streaming
    sum (any NaN or inf makes it non-finite) and one device sync; the exact index search runs
    only when the sum is not finite (a NaN/inf, or a sum that overflowed: then nothing is raised)."""
    if x.numel() == 0:
        return
    if compiling():
        finite = torch.isfinite(x)
        assert_on_device(finite if valid is None else finite | ~_leading(valid, x), name, "non-finite value")
        return
    if valid is None:
        total = x.sum()
    else:  # per-row sums (no [N, H] temporary), padding rows selected out
        total = torch.where(valid, x.reshape(*valid.shape, -1).sum(-1), 0).sum()
    if bool(torch.isfinite(total)):
        return
    bad = ~torch.isfinite(x)
    if valid is not None:
        bad &= _leading(valid, x)
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape)) if x.dim() else ()
        raise ValueError(f"{name}: non-finite value {x[idx].item()} at index {list(idx)}")


def check_devices(**tensors) -> torch.device:
    """All tensors readable (refuse_unreadable) and on one device (non-tensors are left to the
    type checks); returns it."""
    for n, t in tensors.items():
        if isinstance(t, torch.Tensor):
            refuse_unreadable(n, t)
    devices = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if not devices:
        raise TypeError(f"{next(iter(tensors))}: expected a torch.Tensor")
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"{n}: on {d}, but {first_name} is on {first}; all tensors must share one device")
    return first


def check_mask(mask, shape, check_values: bool) -> torch.Tensor:
    """bool, or 0/1 of any real dtype, shaped like logp -> flat bool."""
    mask = admit("mask", mask)
    if tuple(mask.shape) != tuple(shape):
        fail("mask", f"shape {list(mask.shape)} does not match logp's {list(shape)}")
    if mask.dtype == torch.bool:
        return mask.reshape(-1)
    if mask.is_complex():
        raise TypeError(f"mask: expected bool or 0/1 values, got {mask.dtype}")
    if check_values and compiling():
        assert_on_device((mask == 0) | (mask == 1), "mask", "values must be 0 or 1 (or bool)")
    elif check_values and bool(((mask != 0) & (mask != 1)).any()):
        fail("mask", "values must be 0 or 1 (or bool)")
    return (mask != 0).reshape(-1)


def check_logp(name: str, logp, check_values: bool) -> torch.Tensor:
    """-> logp admitted; with check_values, finite and <= 0 everywhere (see check_values_of_logp)."""
    logp = check_tensor(name, logp)
    if logp.dim() not in (1, 2):
        fail(name, f"expected [N] or [B, T], got shape {list(logp.shape)}")
    if check_values:
        check_values_of_logp(name, logp, None)
    return logp


def check_values_of_logp(name: str, logp: torch.Tensor, valid: Optional[torch.Tensor]) -> None:
    """Finite and <= 0 at the ``valid`` positions (bool, logp's shape), or everywhere when None."""
    check_finite(name, logp, valid)
    positive = logp > 0 if valid is None else (logp > 0) & valid
    if compiling():
        assert_on_device(~positive, name, "log-probabilities must be <= 0")
    elif bool(positive.any()):
        flat = int(positive.reshape(-1).nonzero()[0, 0])
        fail(name, f"log-probabilities must be <= 0; found {logp.reshape(-1)[flat].item()} at flat index {flat}")


def check_advantages(advantages, logp: torch.Tensor, check_values: bool,
                     valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shaped like logp, or [B] per sequence when logp is [B, T]; returns flat [N]. The value
    check looks only at ``valid`` positions (bool, logp's shape) when given."""
    advantages = check_tensor("advantages", advantages)
    if tuple(advantages.shape) == tuple(logp.shape):
        adv = advantages
    elif logp.dim() == 2 and tuple(advantages.shape) == (logp.shape[0],):
        adv = advantages[:, None].expand(logp.shape)
    else:
        fail("advantages", f"shape {list(advantages.shape)} must equal logp's {list(logp.shape)}"
             + (f" or be [B] = [{logp.shape[0]}]" if logp.dim() == 2 else ""))
    if check_values:
        check_finite("advantages", adv, valid)
    return adv.reshape(-1)


def check_token_weights(name: str, x, shape, mask: torch.Tensor, check_values: bool) -> Optional[torch.Tensor]:
    """Optional per-token factors (coef, rollout_is_weights) shaped like logp; finite at the
    valid positions (mask: bool, flat or shaped like logp). Padding is not read. Returns the
    admitted tensor (neg/conj bits resolved)."""
    if x is None:
        return None
    x = check_tensor(name, x)
    if tuple(x.shape) != tuple(shape):
        fail(name, f"shape {list(x.shape)} does not match logp's {list(shape)}")
    if check_values:
        check_finite(name, x, valid=mask.reshape(x.shape))
    return x


def check_hidden(name: str, hidden, logp: torch.Tensor, check_values: bool,
                 valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[..., H] with leading dims equal to logp's; returns it as given ([N, H] or [B, T, H]: any
    strides, not copied; rows_for flattens it for the backend). The value check looks only at the
    rows of ``valid`` positions (bool, logp's shape) when given."""
    hidden = check_tensor(name, hidden)
    if hidden.dim() != logp.dim() + 1 or tuple(hidden.shape[:-1]) != tuple(logp.shape):
        fail(name, f"shape {list(hidden.shape)} must be logp's shape {list(logp.shape)} plus a hidden dim")
    if hidden.shape[-1] < 1:
        fail(name, "hidden size must be >= 1")
    if check_values:
        check_finite(name, hidden, valid)
    return hidden


def rows_for(impl, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The row operand x (hidden or vectors, [N, D] or [B, T, D], as check_hidden returns it) as
    the backend module ``impl`` reads it, decided here only. A backend that declares strided_rows
    (_backends.Backend) gets the caller's view when its last dim is contiguous: a [B, T, D] slice
    such as hidden[:, prompt_len:] of [B, S, D] costs no copy (an [N, D] copy is 512 MiB at
    N = 64k, D = 4096, bf16); a contiguous x is flattened to [N, D] (a view). Every other case
    gets a contiguous [N, D] copy: a backend without strided_rows indexes rows as n * D, and a
    last-dim stride other than 1 (e.g. x.conj().imag, a transposed slice) would turn each row read
    into a gather, which neither the vector loads of the kernels nor their row prefetch do."""
    if x is None:
        return None
    if x.is_contiguous():
        return x.reshape(-1, x.shape[-1])
    if (x.stride(-1) == 1 or x.shape[-1] == 1) and reads_strided_rows(impl):
        return x
    return x.reshape(-1, x.shape[-1]).contiguous()


def check_tokens(kind: str, src, logp: torch.Tensor, mask, check_values: bool):
    """Phase B's per-token inputs: -> (src as check_hidden returns it, mask as flat bool [N]). The mask
    comes first: the value checks of logp and src look only at valid positions (padding is don't-care)."""
    flat_mask = check_mask(mask, logp.shape, check_values)
    valid = flat_mask.reshape(logp.shape)
    if check_values:
        check_values_of_logp("logp", logp, valid)
    return check_hidden(kind, src, logp, check_values, valid), flat_mask


def check_sketch_args(sketch_dim: Optional[int], seed: int) -> None:
    if sketch_dim is not None:
        if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int):
            raise TypeError(f"sketch_dim: expected an int or None, got {type(sketch_dim).__name__}")
        if sketch_dim < 1:
            fail("sketch_dim", f"must be >= 1, got {sketch_dim}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        fail("seed", f"must be in [0, 2**32), got {seed}")


def check_finite_numbers(obj, names) -> None:
    """Each named attribute of ``obj`` is a finite int or float (not a bool)."""
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or abs(v) == float("inf"):
            fail(n, f"must be a finite number, got {v!r}")


@dataclass(frozen=True)
class DeltaConfig:
    """Scalar parameters of the coefficient pipeline (validated)."""
    k: int = 1
    lam_min: float = 0.8
    lam_max: float = 1.2
    eps: float = 1e-8

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise TypeError(f"k: expected an int, got {type(self.k).__name__}")
        if self.k < 0:
            fail("k", f"must be >= 0, got {self.k}")
        check_finite_numbers(self, ("lam_min", "lam_max", "eps"))
        if self.lam_min < 0:
            fail("lam_min", f"must be >= 0, got {self.lam_min}")
        if not self.lam_max > 0:
            fail("lam_max", f"must be > 0 (all coefficients would be zero), got {self.lam_max}")
        if self.lam_min > self.lam_max:
            fail("lam_min", f"lam_min={self.lam_min} is greater than lam_max={self.lam_max}")
        if not self.eps > 0:
            fail("eps", f"must be > 0, got {self.eps}")

    def check_compute_dtype(self, dtype: torch.dtype) -> None:
        """Refuse parameters that underflow or overflow in the compute dtype: eps below its
        smallest normal number (it would round to 0, then 0/0), and a lam range whose mapped gates
        lam_max / lam_min (lam_max when lam_min = 0) could overflow a sum over 2**32 tokens."""
        info = torch.finfo(dtype)
        if self.eps < info.tiny:
            fail("eps", f"{self.eps!r} is below the smallest normal {info.tiny:.3g} of {dtype} (the compute dtype)")
        ratio = self.lam_max / (self.lam_min if self.lam_min > 0 else 1.0)
        if ratio > info.max / 2**32:
            fail("lam_max", f"lam_max / lam_min = {ratio:.3g} (lam_max when lam_min = 0) would overflow {dtype} "
                            f"sums of the coefficients; keep it below {info.max / 2**32:.3g}")


@dataclass(frozen=True)
class SurrogateConfig:
    """The per-token clip parameters (the aggregation is delta_kernels.aggregation.Aggregation)."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float = 10.0

    def __post_init__(self):
        check_finite_numbers(self, ("clip_low", "clip_high", "clip_c"))
        if not 0 <= self.clip_low < 1:
            fail("clip_low", f"must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0:
            fail("clip_high", f"must be >= 0, got {self.clip_high}")
        if self.clip_c <= 1:
            fail("clip_c", f"must be > 1 (dual-clip bound), got {self.clip_c}")


@dataclass(frozen=True)
class FipoOptions:
    """FIPO's options (validated): what a credit spec sets; delta_kernels.credit.fipo has their
    meaning. The kernels take FipoConfig, these plus the surrogate's clip_c."""
    decay_rate: float = 32.0
    future_kl_clip_ratio: float = 0.2
    future_kl_clip_high_only: bool = True
    safety_thresh: float = 10.0

    def __post_init__(self):
        check_finite_numbers(self, ("decay_rate", "future_kl_clip_ratio", "safety_thresh"))
        if not isinstance(self.future_kl_clip_high_only, bool):
            raise TypeError(f"future_kl_clip_high_only: expected a bool, got "
                            f"{type(self.future_kl_clip_high_only).__name__}")
        if not self.decay_rate > 0:
            fail("decay_rate", f"must be > 0 (gamma = 2 ** (-1 / decay_rate)), got {self.decay_rate}")
        if self.future_kl_clip_ratio < 0:
            fail("future_kl_clip_ratio", f"must be >= 0 (0 switches the weight clip off), got "
                                         f"{self.future_kl_clip_ratio}")

    def config(self, clip_c: float = 10.0) -> "FipoConfig":
        """The kernels' parameters: these options with the surrogate's clip_c (fields spelled
        out: dataclasses.asdict does not trace under torch.compile)."""
        return FipoConfig(decay_rate=self.decay_rate, future_kl_clip_ratio=self.future_kl_clip_ratio,
                          future_kl_clip_high_only=self.future_kl_clip_high_only,
                          safety_thresh=self.safety_thresh, clip_c=clip_c)


@dataclass(frozen=True)
class FipoConfig(FipoOptions):
    """FIPO's kernel parameters: FipoOptions plus the dual-clip bound c (validated)."""
    clip_c: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        check_finite_numbers(self, ("clip_c",))
        if self.clip_c <= 1:
            fail("clip_c", f"must be > 1 (dual-clip bound; tokens with ratio > clip_c leave the future KL), "
                           f"got {self.clip_c}")

    def bounds(self) -> Tuple[float, float]:
        """(lower, upper) of the weight clip before the safety clamp: [1 - rho, 1 + rho],
        [1, 1 + rho] with clip_high_only, [0, 10] for rho = 0."""
        rho = self.future_kl_clip_ratio
        if rho == 0:
            return 0.0, 10.0
        return (1.0 if self.future_kl_clip_high_only else 1.0 - rho), 1.0 + rho

    def at_bound_limits(self) -> Tuple[float, float]:
        """A weight >= the first or <= the second counts as at a clip bound (the authors' metric:
        within 1e-7 of it; compared in the compute dtype)."""
        lower, upper = self.bounds()
        return upper - 1e-7, lower + 1e-7


@dataclass
class DeltaStats:
    """Final statistics. D is H, or r when sketched; with head_vectors r1 * r2 (an [r1, r2] matrix
    flattened row-major, the index of u[a] s[b] in z = kron(u, s)). Types, the same on every backend: every field
    is a tensor in the compute dtype (float32, float64 for float64 inputs on backend "torch") on the
    inputs' device; the counts (n_pos, n_neg, n_valid) hold whole numbers (exact below 2^24 in
    float32), counted next to the sums they normalise."""
    mu_pos: torch.Tensor     # [D] refined centroid of the positive side
    mu_neg: torch.Tensor     # [D]
    gamma_pos: torch.Tensor  # [] temperature used by the final gates (lags mu by one step)
    gamma_neg: torch.Tensor  # []
    W: torch.Tensor          # [D] mu_pos - mu_neg
    b: torch.Tensor          # [] -(|mu_pos|^2 - |mu_neg|^2) / 2
    pred: torch.Tensor       # like logp: sign(adv) * (v.W + b) * mask ([N] from a backend)
    n_pos: torch.Tensor      # [] valid tokens with adv > 0 (global with a process group)
    n_neg: torch.Tensor      # [] valid tokens with adv < 0
    n_valid: torch.Tensor    # [] valid tokens
    scale: torch.Tensor      # [] self-normalisation factor applied to the mapped gates


class BackendCoefficients(NamedTuple):
    """What every backend's ``delta_coefficients`` returns, on the flat [N] token axis of its
    TokenBatch (delta_coefficients reshapes to logp's shape)."""
    coef: torch.Tensor                 # [N] compute dtype; 0 where masked
    weighted_advantages: torch.Tensor  # [N] advantages * coef where valid, else 0
    stats: DeltaStats

    @classmethod
    def of(cls, coef: torch.Tensor, batch: TokenBatch, **stats: torch.Tensor) -> "BackendCoefficients":
        """Step 7 of docs/design.md on the batch: weighted_adv = adv coef where valid, 0 at padding."""
        weighted = torch.where(batch.mask, batch.advantages.to(coef.dtype) * coef, 0.0)
        return cls(coef=coef, weighted_advantages=weighted, stats=DeltaStats(**stats))


@dataclass
class TokenBatch:
    """Validated, flattened inputs of one call. ``shape`` is logp's original shape. hidden and
    vectors are [N, D] contiguous, or, for a backend that declares strided_rows, the caller's
    [B, T, D] (or [N, D]) view with a contiguous last dim: row n = b T + t (rows_for)."""
    shape: Tuple[int, ...]
    logp: torch.Tensor                      # [N]
    advantages: torch.Tensor                # [N]
    mask: torch.Tensor                      # [N] bool
    hidden: Optional[torch.Tensor] = None   # [N, H] (or a strided view: rows_for)
    vectors: Optional[torch.Tensor] = None  # [N, D], precomputed v or z (or a strided view: rows_for)
    side_sums: Optional[torch.Tensor] = None  # [2, D], precomputed (sum a+ v, sum a- v) of vectors


def check_representable(name: str, value: float, dtype: torch.dtype) -> None:
    """A finite parameter that must stay finite when cast to the compute dtype."""
    if abs(value) > torch.finfo(dtype).max:
        fail(name, f"{value!r} is beyond the largest {dtype} ({torch.finfo(dtype).max:.3g}), the compute dtype")


# Largest |advantage| the float32 pipelines take: sums of a * v over 2**32 tokens stay finite for
# |v| up to about 2**60 (float32 max is about 2**128).
MAX_ADVANTAGE_F32 = 2.0**64


def check_advantage_range(advantages: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> None:
    """float32 compute: valid |advantages| <= MAX_ADVANTAGE_F32 (else the centroid sums overflow,
    and the coefficients would be NaN or silently wrong). The centroids do not change when every
    advantage is scaled by one positive factor, so a caller can rescale. One device sync."""
    if dtype == torch.float64 or advantages.numel() == 0:
        return
    big = (advantages.abs() > MAX_ADVANTAGE_F32) & valid
    if compiling():
        assert_on_device(~big, "advantages", f"|advantages| beyond {MAX_ADVANTAGE_F32:.3g}; scale them down")
    elif bool(big.any()):
        flat = int(big.reshape(-1).nonzero()[0, 0])
        fail("advantages", f"|{advantages.reshape(-1)[flat].item():.3g}| at flat index {flat} is beyond "
                           f"{MAX_ADVANTAGE_F32:.3g}, where float32 centroid sums overflow; scale the advantages "
                           "down (the coefficients do not depend on a common positive factor)")


def compute_dtype(*dtypes) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp32 accumulation for low precision)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
