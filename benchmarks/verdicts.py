"""Every GPU target of the project against its floor, from the result files of one run.

    python benchmarks/verdicts.py RESULTS_DIR [--junit tests.xml ...]

Reads coefficients_*.json, fused_linear_*.json and passes_*.json in RESULTS_DIR (as written by
the benchmarks with --out RESULTS_DIR) and the pytest JUnit files given, and writes
RESULTS_DIR/verdicts.md: one row per target with the measured value, the goal and the verdict
("met", "missed", or "no data" with what is missing). Targets (issue 14):
  - coefficients, triton, N = 65,536, H = 4,096, bf16, k = 1, exact: time <= 1.3 x bandwidth floor
  - fused LM head, surrogate fwd+bwd: time <= Liger's, and <= 1.3 x the 8 M H V matmul floor
  - host time to issue one coefficient call on tiny inputs <= 150 µs
  - device launches per exact k = 1 coefficient call <= 8
"""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def _load(folder: Path, pattern: str):
    files = sorted(folder.glob(pattern))
    return json.loads(files[-1].read_text()) if files else None


def coefficient_rows(folder: Path):
    data = _load(folder, "coefficients_*.json")
    if data is None:
        return [("coefficients, triton, N=65536 H=4096 bf16 k=1 exact", "-", "<= 1.3 x floor",
                 "no data: no coefficients_*.json")]
    out = []
    for r in data["rows"]:
        if r["provider"] not in ("triton", "triton+graph") or r["N"] != 65536 or r["H"] != 4096 or r["k"] != 1:
            continue
        name = f"coefficients, {r['provider']}, N=65536 H=4096 {r['dtype']} k=1 r={r['sketch_dim'] or 'exact'}"
        if r["median_ms"] is None:
            out.append((name, "-", "<= 1.3 x floor", f"no data: {r['note']}"))
            continue
        ratio = r["median_ms"] / r["floor_ms"]
        value = f"{r['median_ms']:.3f} ms = {ratio:.2f} x floor ({r['floor_ms']:.3f} ms)"
        goal = "<= 1.3 x floor" if r["sketch_dim"] == 0 else "(no stated goal)"
        verdict = ("met" if ratio <= 1.3 else "missed") if r["sketch_dim"] == 0 else "-"
        out.append((name, value, goal, verdict))
    return out or [("coefficients, triton, N=65536 H=4096 k=1", "-", "<= 1.3 x floor", "no data: size not run")]


def fused_rows(folder: Path):
    data = _load(folder, "fused_linear_*.json")
    if data is None or data["meta"]["device"] != "cuda":
        return [("fused LM head, surrogate fwd+bwd", "-", "<= liger and <= 1.3 x 8MHV floor",
                 "no data: no GPU fused_linear_*.json")]
    out = []
    rows = [r for r in data["rows"] if r["mode"] == "surrogate fwd+bwd"]
    for m in sorted({r["tokens"] for r in rows}):
        at = {r["provider"]: r for r in rows if r["tokens"] == m}
        ours, liger = at.get("ours"), at.get("liger")
        name = f"fused LM head, surrogate fwd+bwd, M={m}"
        if ours is None or ours.get("status") != "ok":
            out.append((name, "-", "<= liger, <= 1.3 x floor", f"no data: {ours and ours.get('status')}"))
            continue
        ratio = ours["ms_p50"] / ours["floor_ms"]
        out.append((name + " vs floor", f"{ours['ms_p50']:.2f} ms = {ratio:.2f} x floor ({ours['floor_ms']:.2f} ms)",
                    "<= 1.3 x floor", "met" if ratio <= 1.3 else "missed"))
        if liger is None or liger.get("status") != "ok":
            out.append((name + " vs liger", "-", "<= liger", f"no data: liger {liger and liger.get('status')}"))
        else:
            out.append((name + " vs liger", f"ours {ours['ms_p50']:.2f} ms, liger {liger['ms_p50']:.2f} ms",
                        "<= liger", "met" if ours["ms_p50"] <= liger["ms_p50"] else "missed"))
    return out


def pass_rows(folder: Path):
    data = _load(folder, "passes_*.json")
    if data is None:
        return [("fixed cost per call", "-", "<= 150 µs host, <= 8 launches", "no data: no passes_*.json")]
    if data.get("interpreter"):
        return [("fixed cost per call", "-", "<= 150 µs host, <= 8 launches", "no data: CPU run (interpreter)")]
    out = [("host time per coefficient call, N=1024 H=64", f"{data['host_us_per_call_tiny']:.0f} µs", "<= 150 µs",
            "met" if data["host_us_per_call_tiny"] <= 150 else "missed")]
    for c in data["configs"]:
        if c["sketch_dim"] == 0 and c["k"] == 1:
            n = c["launches_per_call"]
            out.append((f"device launches per call, N={c['N']} exact k=1", f"{n:.0f}", "<= 8",
                        "met" if n <= 8 else "missed"))
    return out


def junit_rows(junit_files):
    out = []
    for f in junit_files:
        p = Path(f)
        if not p.exists():
            out.append((f"tests ({p.name})", "-", "all pass", "no data: no JUnit file"))
            continue
        s = ET.parse(p).getroot()
        s = s if s.tag == "testsuite" else s.find("testsuite")
        n, fail, err, skip = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        out.append((f"tests ({p.name})", f"{n - fail - err - skip} passed, {fail + err} failed, {skip} skipped",
                    "all pass", "met" if n and not (fail or err) else "missed"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="folder of the result files")
    ap.add_argument("--junit", nargs="*", default=[], help="pytest JUnit XML files")
    args = ap.parse_args()
    folder = Path(args.results)
    rows = junit_rows(args.junit) + coefficient_rows(folder) + fused_rows(folder) + pass_rows(folder)
    lines = ["# Verdicts: each target against its floor", "", "| target | measured | goal | verdict |",
             "|---|---|---|---|"] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "verdicts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
