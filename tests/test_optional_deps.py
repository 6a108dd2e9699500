"""A missing optional dependency fails with one line naming the extra that brings it.

A missing module is simulated with sys.modules[name] = None (import then raises
ModuleNotFoundError for that name), in a subprocess where the module may already be imported.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from delta_kernels._optional import MissingExtra, install_hint, require

ROOT = Path(__file__).resolve().parents[1]
TRAINER_MODULES = ("transformers", "matplotlib", "tqdm")


def run_python(code: str, hide: str, **env):
    """Run ``code`` in a fresh interpreter where importing ``hide`` fails."""
    prelude = f"import sys; sys.modules[{hide!r}] = None\n"
    full_env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=120)


def one_line_naming(stderr: str, module: str, extra: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert module in lines[0] and lines[0].endswith(install_hint(extra)), lines[0]
    return lines[0]


@pytest.mark.parametrize("module,extra", [("matplotlib", "trainer"), ("tqdm.auto", "trainer"),
                                          ("transformers", "trainer"), ("triton", "triton"), ("trl", "trl"),
                                          ("verl", "verl")])
def test_require_names_the_extra(module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module.split(".")[0], None)
    with pytest.raises(MissingExtra) as info:
        require(module, extra)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(module.split(".")[0] + " is not installed")
    assert msg.endswith(install_hint(extra)) and f"pip install '.[{extra}]'" in msg
    assert isinstance(info.value, ImportError)


def test_verl_and_openrlhf_hints_install_them_without_their_pins():
    assert install_hint("verl") == ("pip install '.[verl]' && pip install --no-deps 'verl==0.9.1' "
                                    "(in the delta-kernels clone)")
    assert install_hint("openrlhf") == ("pip install '.[openrlhf]' && pip install --no-deps 'openrlhf==0.11.2' "
                                        "(in the delta-kernels clone)")


def test_require_returns_the_module():
    import json
    assert require("json", "trainer") is json


def test_missing_dependency_of_an_installed_package_names_the_extra(tmp_path, monkeypatch):
    # verl is installed with --no-deps: a dependency that its extra brings may be missing.
    (tmp_path / "needsdep").mkdir()
    (tmp_path / "needsdep" / "__init__.py").write_text("import no_such_dependency_of_needsdep.core\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "needsdep" / "algos.py").write_text("import another_missing_dependency\n")
    expected = ("needsdep needs {}, which is not installed; it comes with the 'verl' extra: " + install_hint("verl"))
    with pytest.raises(MissingExtra) as info:
        require("needsdep", "verl")
    assert str(info.value) == expected.format("no_such_dependency_of_needsdep")
    (tmp_path / "needsdep" / "__init__.py").write_text("")
    with pytest.raises(MissingExtra) as info:  # the top-level package imports; the submodule's dependency is missing
        require("needsdep.algos", "verl")
    assert str(info.value) == expected.format("another_missing_dependency")
    with pytest.raises(ModuleNotFoundError) as info:  # a submodule this version lacks: not an extra's fault
        require("needsdep.no_such_submodule", "verl")
    assert not isinstance(info.value, MissingExtra)


def test_other_import_errors_propagate(tmp_path, monkeypatch):
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("from json import no_such_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="no_such_name") as info:
        require("brokenpkg", "trainer")
    assert not isinstance(info.value, MissingExtra)


@pytest.mark.parametrize("module", TRAINER_MODULES)
def test_delta_train_help_and_argument_errors_need_no_extra(module):
    main = "from delta_kernels.trainer.__main__ import main; sys.exit(main({}))"
    res = run_python(main.format("['--help']"), module)
    assert res.returncode == 0 and res.stdout.startswith("usage: delta-train") and res.stderr == "", res
    res = run_python(main.format("['--k', '-1']"), module)
    assert res.returncode == 2 and "--k: refinement steps must be >= 0" in res.stderr, res
    assert "not installed" not in res.stderr


@pytest.mark.parametrize("module", TRAINER_MODULES)
def test_delta_train_run_names_the_trainer_extra(module):
    res = run_python("from delta_kernels.trainer.__main__ import main; sys.exit(main(['--steps', '1']))", module)
    assert res.returncode == 1 and res.stdout == ""
    assert one_line_naming(res.stderr, module, "trainer").startswith("delta-train: ")


def test_delta_train_help_once_the_extra_is_installed(capsys):
    from delta_kernels.trainer.__main__ import main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: delta-train") and "--credit" in out


def test_python_m_trainer_names_the_trainer_extra():
    res = run_python("import runpy; sys.argv = ['trainer', '--steps', '1']\n"
                     "runpy.run_module('delta_kernels.trainer', run_name='__main__')", "matplotlib")
    assert res.returncode == 1
    one_line_naming(res.stderr, "matplotlib", "trainer")


def test_trainer_run_checks_the_extra_before_any_work(tmp_path, monkeypatch):
    from delta_kernels.trainer import TrainerConfig, run
    monkeypatch.setitem(sys.modules, "tqdm", None)
    out = tmp_path / "run"
    with pytest.raises(MissingExtra, match=r"tqdm.*not installed.*pip install '\.\[trainer\]'"):
        run(TrainerConfig(steps=1, out=str(out), progress=False))
    assert not out.exists() or not any(out.iterdir())


def test_triton_backend_names_the_triton_extra():
    code = """
        import torch, delta_kernels as dk
        assert "triton" not in dk.available_backends(all=True), dk.available_backends(all=True)
        assert dk.backend_report()["triton"].startswith("no module (MissingExtra: triton is not installed")
        h, logp = torch.randn(5, 8), -torch.rand(5) - 0.1
        for call in (lambda: dk.token_sketch(h, logp, backend="triton"),
                     lambda: dk.fused_linear_logprob_sketch(h, torch.randn(11, 8), torch.randint(0, 11, (5,)),
                                                            backend="triton")):
            try:
                call()
            except (RuntimeError, ImportError) as e:
                print(type(e).__name__, e, file=sys.stderr)
            else:
                raise SystemExit("no error")
    """
    res = run_python(code, "triton", TRITON_INTERPRET="1")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2, res.stderr
    for line in lines:
        assert "triton is not installed" in line and install_hint("triton") in line, line


@pytest.mark.parametrize("module,hide,extra", [
    pytest.param("delta_kernels.integrations.trl", "trl", "trl", id="trl"),
    pytest.param("delta_kernels.integrations.verl", "verl", "verl", id="verl"),
    pytest.param("delta_kernels.integrations.verl", "tensordict", "verl", id="verl_without_tensordict",
                 marks=pytest.mark.skipif(importlib.util.find_spec("verl") is None,
                                          reason="verl is not installed: no verl to import without tensordict")),
    pytest.param("delta_kernels.integrations.openrlhf", "openrlhf", "openrlhf", id="openrlhf")])
def test_integrations_name_their_extra(module, hide, extra):
    """Importing the TRL / verl adapter without its framework (or, for verl installed with
    --no-deps, without one of verl's own dependencies) fails with one line naming the extra."""
    res = run_python(f"""
        from delta_kernels._optional import MissingExtra
        import delta_kernels.integrations  # the framework-free part imports without the extra
        try:
            import {module}
        except MissingExtra as e:
            print(e, file=sys.stderr)
        else:
            raise SystemExit("imported without {hide}")
    """, hide)
    assert res.returncode == 0, res.stderr
    line = one_line_naming(res.stderr, hide, extra)
    assert line.startswith(f"{hide} is not installed" if hide == extra else f"verl needs {hide}"), line
