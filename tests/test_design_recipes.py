"""docs/design.md's "How to add" recipes and call-to-kernel pictures are true.

Each recipe's list of files is read from the document: every named file exists, and the recipe,
done in a temporary copy of the package, works with those files and no others (a backend: one
module and one registry line, and the conformance suite runs it; a credit method: one module;
a loss mode: aggregation.py alone makes it run, and the other two listed files are exactly those
that spell out every mode). Every file a picture names exists.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from delta_kernels import _backends
from delta_kernels.aggregation import AGG_MODES

ROOT = Path(__file__).resolve().parents[1]
DESIGN = (ROOT / "docs" / "design.md").read_text()
RECIPES = "## How to add a backend, a credit method, a loss mode"
PICTURES = "### From the call to the kernels"


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    start = text.index(heading + "\n")
    level = heading.split(" ")[0]
    rest = text[start + len(heading) + 1:]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, flags=re.M)
    return rest[:end.start()] if end else rest


def recipe_files(title: str):
    """The backticked paths of the bullets under "Files to touch:" in recipe ``title``."""
    body = section(section(DESIGN, RECIPES), f"### How to add {title}")
    listed = body.split("Files to touch:\n", 1)[1].strip().split("\n\n", 1)[0]
    return re.findall(r"^- `([^`]+)`", listed, flags=re.M)


BACKEND, CREDIT, LOSS_MODE = "a backend", "a credit method", "a loss (agg) mode"


@pytest.mark.parametrize("title", [BACKEND, CREDIT, LOSS_MODE])
def test_every_file_a_recipe_names_exists(title):
    files = recipe_files(title)
    assert files, title
    for path in files:
        target = ROOT / path
        if "<name>" in path:  # a file the recipe creates: its folder exists, and no such file is there yet
            assert target.parent.is_dir(), path
        else:
            assert target.is_file(), path


def test_the_recipes_list_the_files_the_dry_runs_touch():
    assert recipe_files(BACKEND) == ["delta_kernels/backends/<name>.py", "delta_kernels/_backends.py",
                                     "docs/backends.md"]
    assert recipe_files(CREDIT) == ["delta_kernels/credit/<name>.py", "tests/test_<name>.py"]
    assert recipe_files(LOSS_MODE) == ["delta_kernels/aggregation.py", "delta_kernels/surrogate.py",
                                       "tests/test_surrogate_reference.py"]


def test_every_file_a_picture_names_exists():
    """Paths under delta_kernels/ unless they start with csrc/; a bare name may also sit in the
    folder of a path named before it in the same picture ("csrc/cpu/token_vectors.cpp, side_sums.cpp")."""
    pictures = section(DESIGN, PICTURES)
    blocks = re.findall(r"(?:^    .*\n)+", pictures, flags=re.M)
    assert len(blocks) == 4, "one picture per phase: token sketch, coefficients, surrogate, fused LM head"
    named = 0
    for block in blocks:
        folders = [ROOT / "delta_kernels"]
        for name in re.findall(r"[\w/]+\.(?:py|cpp|cu|cuh|h)\b", block):
            named += 1
            if "/" in name:
                target = ROOT / name if name.startswith("csrc/") else ROOT / "delta_kernels" / name
                assert target.is_file(), name
                folders.append(target.parent)
            else:
                assert any((f / name).is_file() for f in folders), name
    assert named > 40


def test_backends_md_has_a_row_per_registered_backend():
    """Why docs/backends.md is on the backend recipe's list: its table names every backend."""
    table = (ROOT / "docs" / "backends.md").read_text()
    rows = set(re.findall(r"^\| (\w+) \| `delta_kernels\.", table, flags=re.M))
    assert rows == {b.name for b in _backends.registered()}


def test_the_loss_mode_files_are_those_that_spell_out_every_mode():
    """Every .py file under delta_kernels/ and tests/ that names each mode as a string literal is on
    the loss-mode recipe's list, and the other way round."""
    spelled = set()
    for folder in ("delta_kernels", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if all(f'"{mode}"' in text for mode in AGG_MODES):
                spelled.add(path.relative_to(ROOT).as_posix())
    assert spelled == set(recipe_files(LOSS_MODE))


# ---------------------------------------------------------------- dry runs in a copy of the package

def package_copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "delta_kernels", tmp_path / "delta_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def run_in(root: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code`` (or ``python -m pytest args``) with ``root``'s delta_kernels first on sys.path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args] if args else \
        [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


IMPORTS_THE_COPY = """
    import delta_kernels as dk, torch
    assert dk.__file__.startswith({root!r}), dk.__file__
"""


def test_backend_recipe_dry_run(tmp_path):
    """One module and one registry line: the backend runs, and the conformance suite picks it up."""
    root = package_copy(tmp_path)
    (root / "delta_kernels/backends/recipe.py").write_text(
        '"""A backend from the recipe: the reference under another name."""\n'
        "from ..reference import PIPELINE_KERNELS, clipped_surrogate_loss, delta_coefficients, token_sketch  "
        "# noqa: F401\n")
    with open(root / "delta_kernels/_backends.py", "a") as f:
        f.write('register(Backend("recipe", "delta_kernels.backends.recipe", ("cpu",), _FAST, PHASES, -1))\n')
    res = run_in(root, IMPORTS_THE_COPY.format(root=str(root)) + """
    import backend_cases
    assert "recipe" in dk.available_backends()
    assert "recipe" in [p.id for p in backend_cases.backend_params()]
    g = torch.Generator().manual_seed(7)
    h, logp = torch.randn(5, 9, 16, generator=g), -torch.rand(5, 9, generator=g) - 0.01
    adv, mask = torch.randn(5, generator=g), torch.rand(5, 9, generator=g) > 0.2
    a = dk.delta_coefficients(h, logp, adv, mask, backend="recipe")
    b = dk.delta_coefficients(h, logp, adv, mask, backend="torch")
    assert torch.equal(a.coef, b.coef) and torch.equal(a.weighted_advantages, b.weighted_advantages)
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_in(root, "", str(ROOT / "tests" / "test_conformance.py"), "-k",
                 "recipe and (test_delta_coefficients_from_vectors or test_stats_field_types)")
    tail = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-2000:]
    assert res.returncode == 0 and re.search(r"\d+ passed", tail) and "skipped" not in tail, tail


def test_credit_method_recipe_dry_run(tmp_path):
    """One module with its register() call: specs, both loss paths' credit= and the trainer's flags take it."""
    root = package_copy(tmp_path)
    (root / "delta_kernels/credit/recipe_scale.py").write_text(textwrap.dedent('''\
        """A credit method from the recipe: every valid token's weight is one factor."""
        from dataclasses import dataclass

        import torch

        from .registry import IN_LOSS, CreditMethod, CreditWeights, register


        @dataclass(frozen=True)
        class Options:
            factor: float = 0.5


        def compute(inputs, options):
            weights = torch.where(inputs.mask, torch.full_like(inputs.logp, options.factor), 0.0)
            return CreditWeights(weights=weights, metrics=dict(factor=weights.new_tensor(options.factor)))


        register(CreditMethod(name="recipe_scale", kind=IN_LOSS, inputs=("logp", "mask"), depends_on_theta=True,
                              metrics=("factor",), options=Options, compute=compute))
        '''))
    res = run_in(root, IMPORTS_THE_COPY.format(root=str(root)) + """
    from delta_kernels.credit import credit_spec, methods
    from delta_kernels.trainer.config import TrainerConfig, option_flags, validate
    assert "recipe_scale" in methods()
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 7, generator=g, dtype=torch.float64) - 0.05
    logp = (old + 0.2 * torch.randn(4, 7, generator=g, dtype=torch.float64)).clamp_max(-1e-3)
    adv, mask = torch.randn(4, generator=g, dtype=torch.float64), torch.rand(4, 7, generator=g) > 0.2
    spec = credit_spec("recipe_scale", recipe_scale=dict(factor=0.25))
    loss, metrics = dk.clipped_surrogate_loss(logp, old, adv, mask, credit=spec, backend="torch")
    ref, _ = dk.clipped_surrogate_loss(logp, old, adv, mask, coef=torch.full_like(logp, 0.25), backend="torch")
    assert torch.allclose(loss, ref, rtol=1e-12, atol=0) and float(metrics["recipe_scale/factor"]) == 0.25
    assert ("recipe_scale", "factor") in [(m, f.name) for m, f in option_flags()]
    validate(TrainerConfig(credit="recipe_scale*entropy"))
    """)
    assert res.returncode == 0, res.stderr[-3000:]


def test_loss_mode_recipe_dry_run(tmp_path):
    """aggregation.py alone makes a mode run on every backend here and in the trainer's --agg; the
    hand-value test of tests/test_surrogate_reference.py then fails until the mode gets its entry."""
    root = package_copy(tmp_path)
    path = root / "delta_kernels/aggregation.py"
    text = path.read_text()
    anchor = "# mode -> row weights"
    assert anchor in text and '    "token-sum": _token_sum,\n' in text
    text = text.replace(anchor, "def _half_token_sum(n, seq_len, a):\n    return torch.full_like(n, 0.5 * a.dp_size)"
                                "\n\n\n" + anchor)
    path.write_text(text.replace('    "token-sum": _token_sum,\n',
                                 '    "token-sum": _token_sum,\n    "half-token-sum": _half_token_sum,\n'))
    res = run_in(root, IMPORTS_THE_COPY.format(root=str(root)) + """
    from delta_kernels.aggregation import AGG_MODES
    from delta_kernels.trainer.__main__ import build_parser
    assert "half-token-sum" in AGG_MODES
    assert build_parser().parse_args(["--agg", "half-token-sum"]).agg == "half-token-sum"
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(4, 7, generator=g) - 0.05
    logp = (old + 0.2 * torch.randn(4, 7, generator=g)).clamp_max(-1e-3)
    adv, mask = torch.randn(4, generator=g), torch.rand(4, 7, generator=g) > 0.2
    for backend in [b for b in ("torch", "cpp") if b in dk.available_backends()]:
        half, _ = dk.clipped_surrogate_loss(logp, old, adv, mask, agg="half-token-sum", backend=backend)
        whole, _ = dk.clipped_surrogate_loss(logp, old, adv, mask, agg="token-sum", backend=backend)
        assert torch.allclose(2 * half, whole, rtol=1e-6), (backend, half, whole)
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_in(root, "", str(ROOT / "tests" / "test_surrogate_reference.py") + "::test_every_mode_has_a_hand_value")
    assert res.returncode == 1 and "half-token-sum" in res.stdout, res.stdout[-2000:]
