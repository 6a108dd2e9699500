"""Counting the device launches of a call: Triton kernel launches (a hook on JITFunction.run, and
on InterpretedFunction.run under the interpreter) plus torch ops that launch a kernel on a GPU (a
TorchDispatchMode; views, allocations and metadata queries launch nothing and are not counted).
Torch ops run inside a Triton launch (the interpreter's own copies) are not counted either.
Used by tests/test_triton_launches.py and benchmarks/bench_passes.py."""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that launch no device kernel: allocations without a fill, metadata queries, and a view of a fresh tensor
NO_LAUNCH = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
             "aten.is_nonzero.default", "aten.sym_size.int", "aten.sym_numel.default", "aten.sym_stride.int",
             "aten.sym_storage_offset.default", "aten.lift_fresh.default", "prim.device.default",
             "aten._unsafe_view.default"}


class LaunchCounter(TorchDispatchMode):
    """``with LaunchCounter() as lc: fn()``; then lc.launches (total), lc.ops (Counter by name,
    Triton kernels as "triton:<name>")."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self._in_kernel = 0

    @property
    def launches(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not self._in_kernel and not func.is_view and name not in NO_LAUNCH:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def _hook(self, cls):
        original = cls.run
        counter = self

        def run(fn, *args, **kwargs):
            if not counter._in_kernel:
                counter.ops["triton:" + fn.fn.__name__] += 1
            counter._in_kernel += 1
            try:
                return original(fn, *args, **kwargs)
            finally:
                counter._in_kernel -= 1

        cls.run = run
        try:
            yield
        finally:
            cls.run = original

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        self._stack = contextlib.ExitStack()
        for cls in (JITFunction, InterpretedFunction):
            self._stack.enter_context(self._hook(cls))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()
