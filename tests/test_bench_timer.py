"""benchmarks/bench_timer.py, the benchmarks' one timer (CPU path; the CUDA-event path runs in
the GPU check)."""
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_timer import Timing, capture_graph, time_ms, time_providers  # noqa: E402


def test_providers_interleave_after_warmup_and_failures_are_reported():
    calls = []

    def fail():
        raise ValueError("broken provider")
    fns = {"a": lambda: calls.append("a"), "bad": fail, "b": lambda: (calls.append("b"), time.sleep(0.002))}
    res = time_providers(fns, reps=5, warmup=2, cuda=False)
    assert list(res) == ["a", "bad", "b"]
    assert res["bad"] == "ValueError: broken provider"
    assert calls[:4] == ["a", "a", "b", "b"]          # warm-up, provider by provider
    assert calls[4:] == ["a", "b"] * 5                # then interleaved rounds
    for name in ("a", "b"):
        t = res[name]
        assert isinstance(t, Timing) and t.reps == 5 and t.p20_ms <= t.median_ms <= t.p80_ms
    assert res["b"].median_ms >= 2.0 > res["a"].median_ms


def test_budget_stops_rounds_but_keeps_the_minimum():
    t = time_ms(lambda: time.sleep(0.01), reps=100, budget_s=0.0, min_reps=3, warmup=0, cuda=False)
    assert t.reps == 3 and t.median_ms >= 10.0


def test_time_ms_raises_what_the_provider_raised():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        time_ms(lambda: 1 / 0, cuda=False)


def test_capture_graph_says_why_without_cuda():
    import torch
    if torch.cuda.is_available():
        pytest.skip("on a GPU the capture itself is what bench_coefficients reports")
    replay, why = capture_graph(lambda: None)
    assert replay is None and why == "no CUDA device"
