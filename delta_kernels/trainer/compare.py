"""``delta-train compare``: credit arms x seeds of the trainer on one task, paired by seed.

    delta-train compare --task sparse --arms dapo,delta,oracle --seeds 10 --jobs 2

Every (arm, seed) is one trainer run in its own process (forked from this one, so the
imports are paid once; its output goes to the run's log.txt), up to --jobs at a time. The
first run of a seed writes its warm-started model to <out>/warm/seed<S>.pt and the seed's
other arms load it, so all arms of a seed start from the same weights and the same
prompt stream: the arms are paired by seed. Each run keeps its folder <out>/runs/<arm>_seed<S>/
(summary.json, metrics.jsonl, curves.png, responses.html, log.txt); a failed run is reported
and the others go on; --resume skips the runs whose summary.json exists.

Then compare.json, compare.md and compare.png are written from the runs' summary.json and
metrics.jsonl files only (``summarize`` can be rerun on a folder). Final held-out accuracy is a
run's ``final_heldout_accuracy``: the mean of its last --final-evals greedy held-out evaluations.
Intervals are two-sided 95% Student-t intervals over seeds (paired ones over per-seed
differences against the baseline arm, dapo); with fewer than two seeds they are null, with
the reason in settings.

Arms are a table (ARMS): an arm name and the trainer options it sets. Options that compare
does not know are passed to every run (e.g. --lr 1e-3 --max-grad-norm 0.5); a task's compare
defaults (TASK_DEFAULTS) come first, so they can be overridden the same way.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .config import TrainerConfig

# arm name -> trainer options, one line per arm. An arm that needs an option or a value this build of the
# trainer lacks (fipo, entropy: the credit-methods work; delta-head: --delta-vectors) is refused with one line.
ARMS: Dict[str, List[str]] = {
    "dapo": ["--credit", "none"],
    "delta": ["--credit", "delta"],
    "oracle": ["--credit", "oracle"],
    "fipo": ["--credit", "fipo"],
    "entropy": ["--credit", "entropy"],
    "delta-head": ["--credit", "delta", "--delta-vectors", "head"],
}
BASELINE = "dapo"

# The trainer options of each task's comparison (its "default settings"), before the user's own.
TASK_DEFAULTS: Dict[str, List[str]] = {
    "addition": ["--steps", "150", "--eval-every", "25", "--heldout-size", "1024"],
    "sparse": ["--steps", "80", "--prompts-per-step", "8", "--eval-every", "20", "--final-evals", "3",
               "--heldout-size", "1024", "--filler-len", "8", "--filler-chars", "8"],
    "pathstar": ["--steps", "80", "--prompts-per-step", "8", "--eval-every", "20", "--final-evals", "3",
                 "--heldout-size", "1024"],
}
DEFAULT_SEEDS = 10
# --quick: a smoke test of the whole command (2 seeds, a few steps, small warm start and held-out set)
QUICK = ["--steps", "6", "--prompts-per-step", "4", "--group-size", "4", "--minibatches", "2", "--eval-every", "2",
         "--final-evals", "2", "--sft-max-steps", "25", "--heldout-size", "64", "--hidden-size", "32",
         "--num-layers", "1", "--num-heads", "2", "--html-samples", "3"]
QUICK_SEEDS = 2
INTERVAL = "two-sided 95% Student-t interval over seeds (paired: over the per-seed differences), n - 1 df"

# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, then the
    Cornish-Fisher expansion around the normal quantile, within 1e-3)."""
    if df < 1:
        raise ValueError(f"df: expected >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(xs: Sequence[Optional[float]]) -> Dict:
    """{"n", "mean", "ci95": [lo, hi] or None, "reason" when None} over the non-None values."""
    vals = [float(x) for x in xs if x is not None and not math.isnan(x)]
    n = len(vals)
    if n == 0:
        return dict(n=0, mean=None, ci95=None, reason="no finished run")
    m = sum(vals) / n
    if n < 2:
        return dict(n=n, mean=m, ci95=None, reason="one seed: no interval (needs >= 2 seeds)")
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return dict(n=n, mean=m, ci95=[m - half, m + half])


@dataclass
class Run:
    arm: str
    seed: int
    dir: str
    argv: List[str]
    device: str = "cpu"
    proc: Optional[multiprocessing.Process] = None
    rc: Optional[int] = None
    started: float = 0.0
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.arm}_seed{self.seed}"

    @property
    def warm_path(self) -> str:
        return self.argv[self.argv.index("--warm-start-cache") + 1]

    @property
    def done(self) -> bool:
        return os.path.exists(os.path.join(self.dir, "summary.json"))


def build_parser() -> argparse.ArgumentParser:
    from .__main__ import add_task_arguments
    d = TrainerConfig(**{k: None for k in ("digits", "filler_len", "filler_chars", "branches", "path_len",
                                           "heldout_size")})
    p = argparse.ArgumentParser(
        prog="delta-train compare",
        description="Run credit arms x seeds of the trainer on one task (paired by seed: each seed's warm start "
                    "is shared by its arms) and write compare.json, compare.md and compare.png. Trainer options "
                    "not listed here (e.g. --lr 1e-3) are passed to every run.")
    a = p.add_argument
    a("--arms", default="dapo,delta,oracle", help=f"comma-separated arms, from: {', '.join(ARMS)}")
    a("--seeds", type=int, default=None, help=f"number of seeds (default {DEFAULT_SEEDS}; {QUICK_SEEDS} with --quick)")
    a("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    a("--quick", action="store_true", help="smoke test: tiny model, few steps, 2 seeds (minutes on a CPU)")
    a("--resume", action="store_true", help="keep the runs of --out that finished (their summary.json exists)")
    a("--device", choices=("cpu", "cuda"), default="cpu")
    a("--out", default=None, help="output folder (default runs/compare_<task>)")
    a("--jobs", type=int, default=os.cpu_count() or 1, help="runs in parallel (default: the core count)")
    a("--warm-dir", default=None, help="folder of the cached warm starts (default <out>/warm); comparisons with "
                                       "the same task, model and warm-start options can share one")
    a("--shared-warm-start", action="store_true",
      help="one warm start (that of the first seed) for every seed; the seeds then differ in RL only")
    add_task_arguments(p, d)  # defaults None: the task's compare defaults, then the trainer's
    return p


def plan(args, extra: List[str], parser: argparse.ArgumentParser) -> List[Run]:
    """The runs of a comparison, checked before anything starts: arms, options and --out."""
    from .__main__ import build_parser as trainer_parser
    from .config import validate
    tp = trainer_parser()
    arms = [a for a in args.arms.split(",") if a]
    for arm in arms:
        if arm not in ARMS:
            parser.error(f"--arms: unknown arm {arm!r}; expected some of {', '.join(ARMS)}")
        missing = _missing_option(tp, ARMS[arm])
        if missing:
            parser.error(f"--arms: arm {arm!r} needs {missing}, which this build of the trainer lacks")
    if not arms or len(set(arms)) != len(arms):
        parser.error(f"--arms: expected distinct arms from {', '.join(ARMS)}, got {args.arms!r}")
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    if seeds < 1:
        parser.error(f"--seeds: must be >= 1, got {seeds}")
    if args.jobs < 1:
        parser.error(f"--jobs: must be >= 1, got {args.jobs}")
    out = args.out or os.path.join("runs", f"compare_{args.task}")
    task_opts = ["--task", args.task]
    for name in ("digits", "filler_len", "filler_chars", "branches", "path_len", "heldout_size"):
        if getattr(args, name) is not None:
            task_opts += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    common = TASK_DEFAULTS[args.task] + (QUICK if args.quick else []) + task_opts + extra + ["--device", args.device]
    runs = []
    warm_dir = args.warm_dir or os.path.join(out, "warm")
    for seed in range(args.first_seed, args.first_seed + seeds):
        warm_seed = args.first_seed if args.shared_warm_start else seed
        shared = ["--warm-start-seed", str(warm_seed)] if args.shared_warm_start else []
        for arm in arms:
            rdir = os.path.join(out, "runs", f"{arm}_seed{seed}")
            argv = common + ARMS[arm] + shared + ["--seed", str(seed), "--out", rdir, "--no-progress",
                                                  "--warm-start-cache", os.path.join(warm_dir, f"seed{warm_seed}.pt")]
            runs.append(Run(arm, seed, rdir, argv, args.device))
    for r in runs[:len(arms)]:  # each arm's options (unknown options, bad values), before anything starts
        try:
            ns, unknown = tp.parse_known_args(r.argv)
            if unknown:
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            validate(TrainerConfig(**vars(ns)))
        except (ValueError, FileNotFoundError) as e:
            parser.error(f"arm {r.arm!r}: {e}")
    if os.path.isdir(os.path.join(out, "runs")) and not args.resume:
        parser.error(f"--out: {out} already holds runs; pass --resume to keep the finished ones, or another --out")
    return runs


def _missing_option(trainer_parser: argparse.ArgumentParser, options: List[str]) -> Optional[str]:
    """The first of ``options`` (pairs "--name value") that the trainer's parser does not know,
    or whose value is not among its choices; None when all are there."""
    known = {s: a for a in trainer_parser._actions for s in a.option_strings}
    for name, value in zip(options[::2], options[1::2]):
        action = known.get(name)
        if action is None:
            return f"option {name}"
        if action.choices is not None and value not in action.choices:
            return f"{name} {value} (choices: {', '.join(map(str, action.choices))})"
    return None


def execute(runs: List[Run], jobs: int, resume: bool) -> List[Run]:
    """Run the runs, up to ``jobs`` at a time; the runs sharing a warm-start file wait for the
    first of them, which writes it. Returns the runs that failed."""
    todo = [r for r in runs if not (resume and r.done)]
    skipped = len(runs) - len(todo)
    first: Dict[str, Run] = {}
    for r in todo:
        first.setdefault(r.warm_path, r)
    warm_ready = {r.warm_path for r in runs if os.path.exists(r.warm_path)}
    todo = [r for r in todo if first[r.warm_path] is r] + [r for r in todo if first[r.warm_path] is not r]
    tty = sys.stderr.isatty()
    bar = None
    if tty:
        from .._optional import require
        bar = require("tqdm.auto", "trainer").tqdm(total=len(todo), desc="compare runs", dynamic_ncols=True)
    if skipped:
        print(f"compare: {skipped} finished run(s) kept (--resume)", file=sys.stderr, flush=True)
    running: List[Run] = []
    failed: List[Run] = []
    finished = 0
    try:
        while todo or running:
            for r in list(todo):
                if len(running) >= jobs:
                    break
                head = first[r.warm_path]
                if head is not r and r.warm_path not in warm_ready and head.rc is None:
                    continue  # wait for the seed's warm start
                todo.remove(r)
                _start(r)
                running.append(r)
            time.sleep(0.2)
            for r in list(running):
                if r.proc.exitcode is None:
                    continue
                running.remove(r)
                r.rc, r.seconds = r.proc.exitcode, time.perf_counter() - r.started
                finished += 1
                if r is first[r.warm_path]:
                    warm_ready.add(r.warm_path)
                ok = r.rc == 0 and r.done
                if not ok:
                    failed.append(r)
                line = (f"[{finished}/{finished + len(todo) + len(running)}] {r.name}: "
                        + (f"done in {r.seconds:.0f}s" if ok else f"FAILED (exit {r.rc}): {_last_line(r)}"))
                if bar is not None:
                    bar.update(1)
                    bar.write(line)
                else:
                    print(line, file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        for r in running:  # only the processes this compare started
            r.proc.terminate()
        raise
    finally:
        if bar is not None:
            bar.close()
    return failed


def _run_in_child(argv: List[str], log_path: str) -> None:
    """A run's process: stdout and stderr to its log.txt, exit status 1 on any error."""
    import traceback
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    try:
        from .__main__ import parse_config
        from .loop import run
        run(parse_config(argv))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _start(r: Run) -> None:
    os.makedirs(r.dir, exist_ok=True)
    # fork: the imports are paid once; spawn on CUDA (a forked child cannot use a CUDA context)
    fork = "fork" in multiprocessing.get_all_start_methods() and r.device != "cuda"
    method = "fork" if fork else "spawn"
    r.started = time.perf_counter()
    r.proc = multiprocessing.get_context(method).Process(target=_run_in_child,
                                                         args=(r.argv, os.path.join(r.dir, "log.txt")))
    r.proc.start()


def _last_line(r: Run) -> str:
    try:
        lines = [ln for ln in open(os.path.join(r.dir, "log.txt")).read().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "(no output)"
    except OSError:
        return "(no log)"


def main(argv: Optional[List[str]] = None) -> int:
    """``delta-train compare ARGS``; exit status 1 when a run failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    runs = plan(args, extra, parser)
    from .loop import require_trainer_extra  # imported here, once, before the runs fork
    require_trainer_extra()
    from .._optional import require
    require("matplotlib", "trainer").use("Agg")
    require("matplotlib.pyplot", "trainer")
    t0 = time.perf_counter()
    failed = execute(runs, args.jobs, args.resume)
    out = os.path.dirname(os.path.dirname(runs[0].dir))
    from .compare_report import summarize
    result = summarize(out, runs, dict(command="delta-train compare " + " ".join(argv),
                                       quick=args.quick, jobs=args.jobs, wall_s=time.perf_counter() - t0))
    print(open(os.path.join(out, "compare.md")).read())
    if failed:
        print(f"compare: {len(failed)} run(s) failed: {', '.join(r.name for r in failed)} (see their log.txt)",
              file=sys.stderr)
    return 1 if failed or not result["seeds"] else 0
