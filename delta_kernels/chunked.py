"""The coefficient pipeline over a batch stored as chunks (one per DeltaAccumulator.add).

``ChunkedPasses`` wraps a backend's pass kernels (the contract of pipeline.py): each pass runs
the backend's kernel on every stored chunk in add order, concatenates the per-token outputs and
adds the [2, D] sums in that fixed order, so ``run_coefficients`` runs unchanged over the
chunks and a fixed split gives bitwise the same numbers every time.

Per-token pass arguments are sliced to each chunk's rows, everything else is forwarded whole.
By the kernel contract, per-token are: every tensor argument of ``token_vectors`` and
``side_sums`` after the first, and the entries of ``margin_pass``'s gate (its last argument)
after the first, the temperatures. ``margin_pass``'s other arguments (the discriminator) are
forwarded as they are, whatever they are.

``ChunkStore`` holds the chunks' big arrays on the device, or in host memory (pinned on CUDA,
copied back one chunk at a time on a side stream, the next chunk's copy overlapping the current
chunk's pass: two chunks on the device at most).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch


def big_array(item):
    """A stored chunk's [n, D] array: the tensor itself, or the rows of a handle such as ScaledRows."""
    return item if isinstance(item, torch.Tensor) else item.rows


def with_big_array(item, array: torch.Tensor):
    """The chunk with its [n, D] array replaced (a tensor, or the handle with new rows)."""
    return array if isinstance(item, torch.Tensor) else item._replace(rows=array)


class ChunkStore:
    """Where the chunks' big arrays live. ``host=False``: on the device, as given (no copy).
    ``host=True``: a host copy (pinned, written on a side stream, on CUDA; a plain clone on the
    CPU). ``transfers`` counts the chunks handed to a pass from host memory."""

    def __init__(self, device: torch.device, host: bool):
        self.device, self.host = device, host
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if (host and self.cuda) else None
        self.transfers = 0

    def put(self, t: torch.Tensor, host: Optional[bool] = None) -> torch.Tensor:
        """Store one chunk's array: on the device (``host`` False) or in host memory."""
        if not (self.host if host is None else host):
            return t
        if not self.cuda:
            return t.clone()
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out.copy_(t, non_blocking=True)
        t.record_stream(self.stream)
        return out

    def on_device(self, arrays: List[torch.Tensor]):
        """Yield each array on the device, in order. Host arrays on CUDA: the copy of array i + 1
        is issued on the side stream before array i is handed over, so it overlaps array i's pass."""
        def start(t):
            if t.device == self.device:
                return t
            self.transfers += 1
            with torch.cuda.stream(self.stream):
                return t.to(self.device, non_blocking=True)

        if not self.cuda:
            self.transfers += len(arrays) if self.host else 0
            yield from arrays
            return
        main = torch.cuda.current_stream(self.device)
        nxt = start(arrays[0]) if arrays else None
        for i in range(len(arrays)):
            cur = nxt
            if cur is not arrays[i]:
                main.wait_stream(self.stream)
                cur.record_stream(main)
            nxt = start(arrays[i + 1]) if i + 1 < len(arrays) else None
            yield cur


class Chunks(NamedTuple):
    """A batch of N token rows stored as chunks: items[i] covers rows bounds[i]:bounds[i + 1]."""
    items: list
    bounds: List[int]
    store: ChunkStore

    def on_device(self):
        """Yield (i, item with its array on the device) in order."""
        arrays = self.store.on_device([big_array(it) for it in self.items])
        for i, (item, array) in enumerate(zip(self.items, arrays)):
            yield i, with_big_array(item, array)


def _rows(args, lo: int, hi: int):
    return tuple(a[lo:hi] if isinstance(a, torch.Tensor) else a for a in args)


def _fixed_order_sum(parts):
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


class ChunkedPasses:
    """``kernels`` (a backend's pass kernels) run chunk by chunk over ``Chunks``; ``passes``
    counts the passes over the stored chunks."""

    def __init__(self, kernels, compute_dtype: torch.dtype):
        self.kernels, self.compute_dtype = kernels, compute_dtype
        self.passes = 0

    def token_vectors(self, hidden: Chunks, *args):
        self.passes += 1
        items, sums = [], []
        for i, item in hidden.on_device():
            lo, hi = hidden.bounds[i], hidden.bounds[i + 1]
            v, s = self.kernels.token_vectors(item, *_rows(args, lo, hi))
            if big_array(v) is item:        # a handle over the stored rows: keep it over the stored copy
                v = with_big_array(v, big_array(hidden.items[i]))
            elif hidden.store.host:          # vectors written by the kernel: store them instead
                v = with_big_array(v, hidden.store.put(big_array(v)))
            items.append(v)
            sums.append(s)
        return Chunks(items, hidden.bounds, hidden.store), _fixed_order_sum(sums)

    def side_sums(self, v: Chunks, *args):
        self.passes += 1
        return _fixed_order_sum([self.kernels.side_sums(item, *_rows(args, v.bounds[i], v.bounds[i + 1]))
                                 for i, item in v.on_device()])

    def margin_pass(self, v: Chunks, *args):
        self.passes += 1
        params, gate = args[:-1], args[-1]
        outs = []
        for i, item in v.on_device():
            lo, hi = v.bounds[i], v.bounds[i + 1]
            chunk_gate = None if gate is None else (gate[0],) + _rows(gate[1:], lo, hi)
            outs.append(self.kernels.margin_pass(item, *params, chunk_gate))
        m = torch.cat([o[0] for o in outs])
        return m, None if outs[0][1] is None else _fixed_order_sum([o[1] for o in outs])
