"""The one timer of the benchmarks: interleaved providers, median and spread.

``time_providers({"a": fa, "b": fb}, reps=...)`` warms every provider up, then runs rounds in
which each provider is called once, in turn, so that all see the same machine state (clock
boosts, other users of a shared CPU). Each call is timed on its own: with CUDA events around
the call on the GPU (the device time of the work the call enqueues; one synchronisation per
round), with ``time.perf_counter`` on the CPU (or ``clock``: e.g. ``time.thread_time``, the
calling thread's CPU time, which a shared machine's other users do not inflate). Results are
medians with the 20th and 80th percentiles as the spread. A provider that raises during its
warm-up is dropped from the rounds and reported by its error.

``capture_graph(fn)`` records fn in a CUDA graph and returns a function that replays it, or the
reason it cannot be captured.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch


class Timing(NamedTuple):
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _summary(times: List[float]) -> Timing:
    s = sorted(times)
    q = lambda p: s[min(len(s) - 1, round(p * (len(s) - 1)))]  # noqa: E731
    return Timing(statistics.median(s), q(0.2), q(0.8), len(s))


def time_providers(fns: Dict[str, Callable[[], object]], reps: int = 15, budget_s: Optional[float] = None,
                   warmup: int = 2, min_reps: int = 3, cuda: Optional[bool] = None,
                   clock: Callable[[], float] = time.perf_counter) -> Dict[str, Union[Timing, str]]:
    """-> {name: Timing in ms, or "ErrorType: message" when the provider failed its warm-up}.

    reps: rounds at most; budget_s: stop starting rounds after this many seconds (at least
    min_reps rounds run); warmup: untimed calls of each provider first; cuda: time with CUDA
    events (default: when CUDA is available); clock: the CPU timer, in seconds."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    out: Dict[str, Union[Timing, str]] = {}
    live = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            if cuda:
                torch.cuda.synchronize()
            live[name] = fn
        except Exception as e:  # noqa: BLE001 - one failing provider must not stop the others
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if cuda:
                torch.cuda.empty_cache()
    times: Dict[str, List[float]] = {n: [] for n in live}
    start = time.perf_counter()
    for i in range(reps):
        if budget_s is not None and i >= min_reps and time.perf_counter() - start > budget_s:
            break
        events: List[Tuple[str, object, object]] = []
        for name, fn in live.items():
            if cuda:
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0.record()
                fn()
                t1.record()
                events.append((name, t0, t1))
            else:
                t0 = clock()
                fn()
                times[name].append((clock() - t0) * 1e3)
        if cuda:
            torch.cuda.synchronize()
            for name, t0, t1 in events:
                times[name].append(t0.elapsed_time(t1))
    out.update({n: _summary(t) for n, t in times.items()})
    return {n: out[n] for n in fns}


def time_ms(fn: Callable[[], object], **kwargs) -> Timing:
    """One provider; raises what the provider raises. kwargs as for time_providers."""
    res = time_providers({"fn": fn}, **kwargs)["fn"]
    if isinstance(res, str):
        raise RuntimeError(res)
    return res


def capture_graph(fn: Callable[[], object]) -> Tuple[Optional[Callable[[], None]], str]:
    """-> (replay, "") with fn recorded in a CUDA graph (warmed up on a side stream first, as
    torch requires), or (None, why) when there is no GPU or the capture fails."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - the reason is the result
        try:
            torch.cuda.synchronize()
        except RuntimeError:
            pass  # a failed capture can leave an error on the stream; the reason below names it
        return None, f"not capturable: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return graph.replay, ""
