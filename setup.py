"""Builds delta_kernels._cpp (always) and delta_kernels._cuda (when nvcc is found) with CMake + Ninja.
The package metadata (version, dependencies, extras, entry points) lives in pyproject.toml.

Environment: DELTA_KERNELS_CUDA=auto|1|0 (default auto; 1 fails loudly without nvcc),
DELTA_KERNELS_BUILD_JOBS (default: all cores).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        mode = os.environ.get("DELTA_KERNELS_CUDA", "auto").strip().lower()
        flag = {"auto": "AUTO", "1": "ON", "on": "ON", "0": "OFF", "off": "OFF"}.get(mode)
        if flag is None:
            raise RuntimeError(f"DELTA_KERNELS_CUDA must be auto, 1 or 0, got {mode!r}")
        out_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).resolve().parent
        import pybind11
        cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
        if cmake is None or ninja is None:
            raise RuntimeError("building delta_kernels needs cmake and ninja on PATH (pip install cmake ninja)")
        tools = [f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                 f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        build_dir = tool_build_dir(Path(self.build_temp).resolve() / "cmake", "\n".join([cmake] + tools))
        cfg = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", *tools,
               f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}", f"-DDELTA_KERNELS_CUDA={flag}"]
        subprocess.run(cfg, check=True)
        jobs = os.environ.get("DELTA_KERNELS_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


def tool_build_dir(build_dir: Path, tools: str) -> Path:
    """``build_dir``, emptied when it was configured with other tools. The CMake cache records absolute
    paths of cmake, ninja, Python and pybind11; under pip's build isolation they lie in a temporary
    environment that pip deletes after the install, so a second ``pip install .`` from the same clone
    would find a cache naming tools that are gone. tools.txt records what configured the directory."""
    stamp = build_dir / "tools.txt"
    if build_dir.exists() and (not stamp.is_file() or stamp.read_text() != tools):
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(tools)
    return build_dir


setup(ext_modules=[CMakeExtension("delta_kernels._cpp")], cmdclass={"build_ext": CMakeBuild}, zip_safe=False)
