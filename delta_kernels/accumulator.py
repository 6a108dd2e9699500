"""Phase B streamed over micro-batches: ``DeltaAccumulator``.

The old-log-prob pass of an RL loop runs micro-batch by micro-batch, and advantages usually
arrive after it. ``add`` stores each micro-batch's vectors (or hidden states), ``finalize``
runs delta_kernels.pipeline.run_coefficients once over the stored chunks (chunked.py), so the
coefficients are those of one ``delta_coefficients`` call on the concatenation.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Union

import torch

from . import _checks as C
from ._backends import names, resolve
from ._formulas import side_masks
from .chunked import ChunkedPasses, Chunks, ChunkStore, big_array, with_big_array
from .coefficients import DeltaResult
from .distributed import group_sum
from .head_factors import HeadFactorPasses, admit_head_vectors, flat_head_vectors
from .pipeline import run_coefficients

STORES = ("auto", "device", "host", "sketch")
DEVICE_BUDGET_FRACTION = 0.25  # store="auto" on CUDA: chunks stay on the device up to this share of its memory


@dataclasses.dataclass
class _Add:
    shape: tuple                      # logp's shape
    logp: torch.Tensor                # [n]
    mask: torch.Tensor                # [n] bool
    advantages: Optional[torch.Tensor]  # [n], or None until finalize


class DeltaAccumulator:
    """DelTA coefficients over micro-batches, with statistics over all of them.

    ::

        acc = DeltaAccumulator(k=1, sketch_dim=None, store="auto")
        for mb in micro_batches:
            acc.add(hidden_mb, logp_mb, mask_mb)        # or add(vectors=z_mb, ...), add(head_vectors=(u, s), ...)
        results = acc.finalize(advantages)             # list of DeltaResult, one per add (mask=: late mask)

    The numbers equal ``delta_coefficients`` on the concatenation of the adds (float64 to
    rounding; float32 to the kernels' tolerance, the sums being added chunk by chunk), are
    bitwise repeatable for a fixed split, and with ``process_group`` the statistics are global
    over the ranks (each rank adds its own micro-batches), as in ``delta_coefficients``.

    Args:
        k, lam_min, lam_max, eps, sketch_dim, seed, process_group, backend: as in
            ``delta_coefficients``. The backend is resolved at the first add from its device
            and dtype (float64 hidden/vectors or logp: torch, in float64).
        store: where the vectors live until ``finalize``:
            "device": kept where they came from (exact mode from hidden states: the hidden
                states themselves, referenced, not copied; do not overwrite them before
                finalize). Device memory: the inputs, N x D.
            "host": copied to host memory at ``add`` (pinned, on a side stream, on CUDA, so
                do not write into an added tensor in place afterwards; a plain copy on the
                CPU) and copied back one chunk (one add) at a time per pass, the next chunk's
                copy overlapping the current pass. Device memory: two micro-batches x H,
                plus O(N) scalars, whatever N. Host memory: N x D.
            "sketch": only z = v @ R is kept, [N, sketch_dim] float32 on the device (needs
                ``sketch_dim``); hidden states are read once, at ``add``.
            "auto": "sketch" when ``sketch_dim`` is set; else "device" while the stored chunks
                fit DEVICE_BUDGET_FRACTION of the device's memory (always on the CPU), then
                "host" for the chunks beyond.
            With ``sketch_dim`` set, "device" and "host" say where z is kept.

    Reads of the stored vectors per ``finalize`` (host mode: each chunk copied back once per
    read): 1 when k = 0, else k + 2 (the temperature pass, k gated passes, the final margins),
    plus 1 for the side sums when the advantages come to ``finalize`` (with advantages at
    ``add`` the side sums are taken then, from the micro-batch already on the device). k = 0..3:
    1, 3, 4, 5 reads, or 2, 4, 5, 6 with late advantages. Exact vectors from hidden states are
    kept implicit where the backend does so (cpp, cuda, triton): "vectors" are the hidden
    states, and nothing [N, H] is written.

    Errors (ValueError/TypeError naming the argument and the add index) leave the accumulator
    as it was: the bad add is not recorded, a failed ``finalize`` check can be retried. After
    ``finalize`` (or an error while it runs) the accumulator is spent and says so.
    """

    def __init__(self, k: int = 1, lam_min: float = 0.8, lam_max: float = 1.2, eps: float = 1e-8,
                 sketch_dim: Optional[int] = None, seed: int = 0, store: str = "auto", process_group=None,
                 backend: str = "auto"):
        self._cfg = C.DeltaConfig(k=k, lam_min=lam_min, lam_max=lam_max, eps=eps)
        C.check_sketch_args(sketch_dim, seed)
        if store not in STORES:
            C.fail("store", f"unknown store {store!r}; expected one of {', '.join(STORES)}")
        if store == "sketch" and sketch_dim is None:
            C.fail("store", "'sketch' keeps z = v @ R and needs sketch_dim")
        if backend not in names():
            C.fail("backend", f"unknown backend {backend!r}; expected one of {', '.join(names())}")
        self.sketch_dim, self.seed, self.store, self.backend = sketch_dim, seed, store, backend
        self._reduce = group_sum(process_group)
        self._adds: List[_Add] = []
        self._items: list = []
        self._side_sums: Optional[torch.Tensor] = None
        self._first = None      # what add 0 fixed: kind, dtypes, device, width, advantages at add
        self._kernels = self._chunk_store = self._impl = None
        self._spent: Optional[str] = None
        self._stored_bytes = 0

    def __len__(self) -> int:
        """Number of adds so far."""
        return len(self._adds)

    def _check_open(self, op: str) -> None:
        if self._spent is not None:
            raise RuntimeError(f"{op}: this DeltaAccumulator is spent ({self._spent}); make a new one")

    # ------------------------------------------------------------------ add
    def add(self, hidden: Optional[torch.Tensor] = None, logp: Optional[torch.Tensor] = None,
            mask: Optional[torch.Tensor] = None, *, vectors: Optional[torch.Tensor] = None,
            advantages: Optional[torch.Tensor] = None, head_vectors=None) -> None:
        """Store one micro-batch.

        Args:
            hidden: [b, T, H] or [n, H] hidden states entering the LM head (or None with vectors).
            logp: [b, T] or [n] log-probs (<= 0) of the sampled tokens; T may differ between adds.
            mask: shaped like logp, bool or 0/1.
            vectors: [..., D] token vectors v, or their sketch z (D = sketch_dim), e.g. from
                fused_linear_logprob_sketch, instead of hidden. Every add passes the same kind.
            advantages: shaped like logp, or [b]; give them at every add or at none (then to
                ``finalize``).
            head_vectors: (u [..., r1], s [..., r2]) from head_gradient_sketch instead of hidden:
                DelTA on the LM-head gradients u (x) s (see delta_coefficients); stored as
                [n, r1 + r2] (memory N (r1 + r2)); needs sketch_dim None.
        """
        self._check_open("add")
        i = len(self._adds)
        try:
            record, src, flat_src = self._check_add(hidden, logp, mask, vectors, advantages, head_vectors)
        except (ValueError, TypeError) as e:
            raise type(e)(f"add {i}: {e}") from None
        try:
            item, sums = self._ingest(record, src, flat_src)
        except BaseException:
            if i == 0:          # nothing was added: the next add may start afresh
                self._first = None
            raise
        self._items.append(item)
        self._side_sums = sums if self._side_sums is None or sums is None else self._side_sums + sums
        self._adds.append(record)

    def _check_add(self, hidden, logp, mask, vectors, advantages, head_vectors):
        if logp is None:
            raise TypeError("logp: required")
        if mask is None:
            raise TypeError("mask: required")
        if head_vectors is not None and (hidden is not None or vectors is not None):
            C.fail("head_vectors", "replace hidden and vectors; pass only head_vectors")
        if head_vectors is None and (hidden is None) == (vectors is None):
            C.fail("hidden", "pass exactly one of hidden and vectors")
        if head_vectors is not None:
            if self.sketch_dim is not None:
                C.fail("head_vectors", "are sketched already; make the DeltaAccumulator with sketch_dim=None")
            kind, src = "head_vectors", admit_head_vectors(head_vectors)
            device = C.check_devices(**{"head_vectors[0]": src[0], "head_vectors[1]": src[1]}, logp=logp, mask=mask,
                                     advantages=advantages)
            dtype, width = src[0].dtype, (src[0].shape[-1], src[1].shape[-1])
        else:
            kind, src = ("hidden", hidden) if vectors is None else ("vectors", vectors)
            device = C.check_devices(**{kind: src}, logp=logp, mask=mask, advantages=advantages)
            src = C.check_tensor(kind, src)
            dtype, width = src.dtype, src.shape[-1]
        logp = C.check_logp("logp", logp, False)
        if advantages is not None:
            advantages = C.check_tensor("advantages", advantages)
        now = dict(kind=kind, device=device, dtype=dtype, logp_dtype=logp.dtype, width=width,
                   early=advantages is not None, adv_dtype=None if advantages is None else advantages.dtype)
        if self._first is not None:
            self._check_like_first(now)
        if kind == "head_vectors":
            flat_mask = C.check_mask(mask, logp.shape, True)
            C.check_values_of_logp("logp", logp, flat_mask.reshape(logp.shape))
            flat_src = flat_head_vectors(*src, logp, flat_mask.reshape(logp.shape), True)
        else:
            flat_src, flat_mask = C.check_tokens(kind, src, logp, mask, True)
        if logp.numel() == 0:
            C.fail("logp", "an add needs at least one token")
        dtype = C.compute_dtype(now["dtype"], logp.dtype, advantages.dtype if advantages is not None else torch.float32)
        self._cfg.check_compute_dtype(dtype)
        adv = None
        if advantages is not None:
            adv = C.check_advantages(advantages, logp, True, flat_mask.reshape(logp.shape))
            C.check_advantage_range(adv, flat_mask, dtype)
        if kind == "vectors" and self.sketch_dim is not None and src.shape[-1] != self.sketch_dim:
            C.fail("vectors", f"last dim {src.shape[-1]} differs from sketch_dim={self.sketch_dim}")
        if self._first is None:
            self._start(now)
        return _Add(tuple(logp.shape), logp.reshape(-1), flat_mask, adv), src, flat_src

    def _check_like_first(self, now) -> None:
        was = self._first
        if now["kind"] != was["kind"]:
            C.fail(now["kind"], f"add 0 passed {was['kind']}; every add must pass the same kind")
        if now["early"] != was["early"]:
            C.fail("advantages", "give advantages at every add or at none (then to finalize); add 0 "
                   + ("had them" if was["early"] else "had none"))
        for key, name in (("device", now["kind"]), ("dtype", now["kind"]), ("logp_dtype", "logp"),
                          ("adv_dtype", "advantages")):
            if now[key] != was[key]:
                C.fail(name, f"{key.replace('logp_', '').replace('adv_', '')} {now[key]} differs from add 0's "
                       f"{was[key]}")
        if now["width"] != was["width"]:
            C.fail(now["kind"], f"last dim {now['width']} differs from add 0's {was['width']}")

    def _start(self, first) -> None:
        dtype = C.compute_dtype(first["dtype"], first["logp_dtype"], first["adv_dtype"] or torch.float32)
        impl = resolve(self.backend, first["device"], dtype, "PIPELINE_KERNELS")
        self._first, self._dtype = first, dtype
        self._kernels = HeadFactorPasses(dtype) if first["kind"] == "head_vectors" else impl.PIPELINE_KERNELS
        self._impl = impl
        self._chunk_store = ChunkStore(first["device"], host=self.store == "host")
        self._budget = None
        if self.store == "auto" and first["device"].type == "cuda":
            self._budget = DEVICE_BUDGET_FRACTION * torch.cuda.get_device_properties(first["device"]).total_memory

    def _put(self, t: torch.Tensor) -> torch.Tensor:
        host = None
        if self._budget is not None:
            self._stored_bytes += t.numel() * t.element_size()
            host = self._stored_bytes > self._budget
        return self._chunk_store.put(t, host)

    def _ingest(self, record: _Add, src, flat_src):
        """-> (stored chunk, its side sums or None). Reads the micro-batch once when it has
        advantages (side sums) or is sketched here; else only stores it."""
        flat_src = with_big_array(flat_src, C.rows_for(self._impl, big_array(flat_src)))
        early = record.advantages is not None
        if early:
            _, _, _, a_pos, a_neg = side_masks(record.advantages, record.mask, self._dtype)
        else:
            a_pos = a_neg = torch.zeros(record.logp.shape, dtype=self._dtype, device=record.logp.device)
        if self._first["kind"] == "hidden" and (early or self.sketch_dim is not None):
            v, sums = self._kernels.token_vectors(flat_src, record.logp.to(self._dtype), a_pos, a_neg,
                                                  self.sketch_dim, self.seed)
            return with_big_array(v, self._put(big_array(v))), sums if early else None
        sums = self._kernels.side_sums(flat_src, a_pos, a_neg) if early else None
        return with_big_array(flat_src, self._put(big_array(flat_src))), sums

    # ------------------------------------------------------------- finalize
    def finalize(self, advantages: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
                 mask: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None) -> List[DeltaResult]:
        """Coefficients of every add, with statistics over all adds (and ranks).

        Args:
            advantages: None when every add had advantages; else one tensor per add (each
                shaped like that add's logp, or [b]), or one tensor for their concatenation:
                [sum n] flat over all tokens, [sum b] per sequence or [sum b, T] (adds of
                shape [b, T]).
            mask: an optional late mask (e.g. TRL's tool_mask, known only after the pass),
                ANDed with the add masks: one tensor per add (shaped like that add's logp,
                bool or 0/1), or one for their concatenation ([sum n], or [sum b, T] when every
                add is [b, T]). Only with the advantages given here: with advantages at add the
                side sums were taken then, under the add masks.
        Returns:
            one DeltaResult per add, in add order: coef and weighted_advantages shaped like
            that add's logp; stats shared (stats.pred shaped like that add's logp). The
            numbers are those of ``delta_coefficients`` on the concatenation with the
            combined mask.
        """
        self._check_open("finalize")
        if not self._adds:
            raise RuntimeError("finalize: nothing was added")
        masks = self._finalize_masks(mask)
        adv = self._finalize_advantages(advantages, masks)
        self._spent = "an error while finalize ran"
        try:
            results = self._run(adv, masks)
        finally:
            self._items, self._side_sums = [], None
        self._spent = "finalize returned"
        return results

    def _finalize_advantages(self, advantages, masks: List[torch.Tensor]) -> List[torch.Tensor]:
        """[n] per add, checked at the valid positions of ``masks`` (the combined masks) only."""
        if self._first["early"]:
            if advantages is not None:
                C.fail("advantages", "given twice: every add had advantages; call finalize() without them")
            return [a.advantages for a in self._adds]
        if advantages is None:
            C.fail("advantages", "missing: no add had advantages, so finalize needs them")
        if isinstance(advantages, torch.Tensor):
            C.check_tensor("advantages", advantages)
            advantages = self._split_concatenated(advantages, "advantages")
        if len(advantages) != len(self._adds):
            C.fail("advantages", f"{len(advantages)} tensors for {len(self._adds)} adds")
        out = []
        for i, (a, rec, valid) in enumerate(zip(advantages, self._adds, masks)):
            try:
                C.check_devices(logp=rec.logp, advantages=a)
                adv = C.check_advantages(a, rec.logp.reshape(rec.shape), True, valid.reshape(rec.shape))
                C.check_advantage_range(adv, valid, self._dtype)
                out.append(adv)
            except (ValueError, TypeError) as e:
                raise type(e)(f"add {i}: {e}") from None
        return out

    def _finalize_masks(self, mask) -> List[torch.Tensor]:
        """The add masks, ANDed with the late mask when one is given: [n] bool per add."""
        if mask is None:
            return [a.mask for a in self._adds]
        if self._first["early"]:
            C.fail("mask", "a late mask needs the advantages at finalize: the adds had advantages, so their side "
                           "sums were taken under the add masks; pass the combined mask to add instead")
        if isinstance(mask, torch.Tensor):
            mask = self._split_concatenated(mask, "mask")
        if len(mask) != len(self._adds):
            C.fail("mask", f"{len(mask)} tensors for {len(self._adds)} adds")
        out = []
        for i, (m, rec) in enumerate(zip(mask, self._adds)):
            try:
                C.check_devices(logp=rec.logp, mask=m)
                out.append(rec.mask & C.check_mask(m, rec.shape, True))
            except (ValueError, TypeError) as e:
                raise type(e)(f"add {i}: {e}") from None
        return out

    def _split_concatenated(self, t: torch.Tensor, name: str) -> List[torch.Tensor]:
        """One tensor over all adds -> one per add: [sum n] flat, or split by rows when every add
        is [b, T] ([sum b] or [sum b, T]; the per-add checks then judge the shape)."""
        n = [a.logp.numel() for a in self._adds]
        if t.dim() == 1 and t.shape[0] == sum(n):
            return [p.reshape(a.shape) for p, a in zip(t.split(n), self._adds)]
        by_rows = all(len(a.shape) == 2 for a in self._adds)
        rows = sum(a.shape[0] for a in self._adds) if by_rows else None
        if by_rows and t.dim() >= 1 and t.shape[0] == rows:
            return list(t.split([a.shape[0] for a in self._adds]))
        options = f"[{sum(n)}] (all tokens)"
        if by_rows:
            options += (f", [{rows}] or [{rows}, T]" if name == "advantages" else f" or [{rows}, T]")
        C.fail(name, f"shape {list(t.shape)}: expected one tensor per add, or {options}")

    def _run(self, adv: List[torch.Tensor], masks: List[torch.Tensor]) -> List[DeltaResult]:
        adds = self._adds
        bounds = [0]
        for a in adds:
            bounds.append(bounds[-1] + a.logp.numel())
        chunks = Chunks(self._items, bounds, self._chunk_store)
        from_hidden = self._first["kind"] == "hidden" and self.sketch_dim is None and not self._first["early"]
        batch = C.TokenBatch(shape=(bounds[-1],), logp=torch.cat([a.logp for a in adds]),
                             advantages=torch.cat(adv), mask=torch.cat(masks),
                             hidden=chunks if from_hidden else None, vectors=None if from_hidden else chunks,
                             side_sums=self._side_sums)
        out = run_coefficients(ChunkedPasses(self._kernels, self._dtype), batch, self._cfg, None, self.seed,
                               self._reduce)
        results = []
        for a, lo, hi in zip(adds, bounds, bounds[1:]):
            stats = dataclasses.replace(out.stats, pred=out.stats.pred[lo:hi].reshape(a.shape))
            results.append(DeltaResult(coef=out.coef[lo:hi].reshape(a.shape),
                                       weighted_advantages=out.weighted_advantages[lo:hi].reshape(a.shape),
                                       stats=stats))
        return results
