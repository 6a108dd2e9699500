"""The trainer with every credit method of the registry: flags, and their metrics in metrics.jsonl."""
from __future__ import annotations

import os

import pytest

from delta_kernels.trainer.__main__ import parse_config
from delta_kernels.trainer.loop import run
from delta_kernels.trainer.report import read_metrics
from test_trainer import tiny_config

pytest.importorskip("transformers")


def test_method_flags_reach_the_config():
    cfg = parse_config(["--credit", "delta*fipo*entropy", "--fipo-decay-rate", "64", "--fipo-future-kl-clip-ratio",
                        "0", "--fipo-future-kl-clip-high-only", "false", "--entropy-top-quantile", "0.5"])
    assert cfg.credit == "delta*fipo*entropy"
    assert cfg.credit_options == {"fipo": dict(decay_rate=64.0, future_kl_clip_ratio=0.0,
                                               future_kl_clip_high_only=False), "entropy": dict(top_quantile=0.5)}
    assert parse_config(["--credit", "fipo"]).credit_options == {}


FIPO_KEYS = {f"fipo/{k}" for k in ("weight_mean", "weight_min", "weight_max", "rows_dropped", "clip_frac")}
ENTROPY_KEYS = {"entropy/threshold", "entropy/kept_frac"}


@pytest.mark.parametrize("credit,options,keys", [
    ("fipo", {"fipo": dict(decay_rate=8.0)}, FIPO_KEYS),
    ("entropy", {"entropy": dict(top_quantile=0.5)}, ENTROPY_KEYS),
    ("delta*entropy", {}, ENTROPY_KEYS),
])
def test_each_method_trains_and_logs_its_metrics(tmp_path, credit, options, keys):
    s = run(tiny_config(tmp_path, credit.replace("*", "_"), credit=credit, credit_options=options, seed=3, steps=2,
                        sft_max_steps=5))
    rows = read_metrics(os.path.join(s["out"], "metrics.jsonl"))
    assert len(rows) == 2 and keys <= set(rows[0]), sorted(rows[0])
    for r in rows:
        if "fipo/weight_min" in r:
            assert 0.8 - 1e-6 <= r["fipo/weight_min"] <= r["fipo/weight_mean"] <= r["fipo/weight_max"] <= 1.2 + 1e-6
        if "entropy/kept_frac" in r:
            assert 0.0 < r["entropy/kept_frac"] <= 1.0
    if credit == "entropy":
        assert all(r["coef_min"] == r["coef_max"] == 1.0 for r in rows)  # no DelTA: coefficients 1
