"""The CUDA row kernels read rows as 16-byte vectors and the sketch runs on the tensor cores: csrc/cuda compiled
for sm_80 and sm_90, its SASS (cuobjdump -sass) read per kernel. Needs nvcc and cuobjdump (on PATH, or the copy
that ships with triton); no GPU."""
from __future__ import annotations

import collections
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# mangled element type -> (name, elements per 16-byte vector)
TYPES = {"f": ("float32", 4), "13__nv_bfloat16": ("bfloat16", 8), "6__half": ("float16", 8)}
KERNEL = re.compile(r"row_pass_kernelI(f|13__nv_bfloat16|6__half)Li(\d+)ELb([01])E")
MEMORY_OP = re.compile(r"\b((?:LDG|STG|LDL|STL)(?:\.[A-Z0-9_]+)*)")


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def _kernels_sass(arch, source, tmp):
    """{mangled kernel name: its SASS} of csrc/cuda/<source> compiled for arch."""
    nvcc, cuobjdump = shutil.which("nvcc"), _cuobjdump()
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and cuobjdump")
    cubin = tmp / (Path(source).stem + ".cubin")
    build = subprocess.run([nvcc, "-cubin", "-std=c++17", "-O3", f"-arch={arch}", "--expt-relaxed-constexpr",
                            str(ROOT / "csrc" / "cuda" / source), "-o", str(cubin)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, timeout=120)
    assert sass.returncode == 0, sass.stderr
    parts = re.split(r"\n\s*Function : (\S+)\n", sass.stdout)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def row_kernels(request, tmp_path_factory):
    """{(type, VEC, regs): Counter of global/local memory instructions} of the row_pass kernels."""
    kernels = {}
    for name, body in _kernels_sass(request.param, "row_pass.cu", tmp_path_factory.mktemp(request.param)).items():
        m = KERNEL.search(name)
        if m:
            kernels[(TYPES[m[1]][0], int(m[2]), m[3] == "1")] = collections.Counter(MEMORY_OP.findall(body))
    return kernels


def _wide(ops, kind):
    return sum(n for op, n in ops.items() if op.startswith(kind + ".") and ".128" in op)


@pytest.mark.parametrize("regs", [True, False], ids=["sums_in_registers", "sums_in_shared"])
@pytest.mark.parametrize("mangled", list(TYPES), ids=[t[0] for t in TYPES.values()])
def test_row_kernels_use_128_bit_loads(row_kernels, mangled, regs):
    dtype, vec = TYPES[mangled]
    ops = row_kernels[(dtype, vec, regs)]
    k = 16 // vec  # row vectors per thread per tile: all loaded before use
    assert _wide(ops, "LDG") >= 2 * k, ops  # the row (dot pass and sums pass) plus w and c
    assert _wide(ops, "STG") >= 1, ops  # v written back as 16-byte vectors
    # No element-wide load of the rows: 16-bit loads none, and 32-bit loads only for the per-token scalars
    # (scale, gamma[0], gamma[1], a_pos and a_neg, the last two also read ahead to decide whether the next
    # row is loaded), where the scalar fallback has one per element.
    narrow = sum(n for op, n in ops.items() if op.startswith("LDG.") and ".128" not in op)
    assert narrow <= 12, ops
    scalar = row_kernels[(dtype, 1, regs)]
    assert sum(n for op, n in scalar.items() if op.startswith("LDG.")) > 16 + narrow  # the test can tell them apart


@pytest.mark.parametrize("mangled", list(TYPES), ids=[t[0] for t in TYPES.values()])
def test_register_sums_do_not_spill(row_kernels, mangled):
    dtype, vec = TYPES[mangled]
    ops = row_kernels[(dtype, vec, True)]
    assert not any(op.startswith(("LDL", "STL")) for op in ops), ops


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sketch_kernels_use_tensor_cores(arch, tmp_path):
    sass = {name: body for name, body in _kernels_sass(arch, "token_vectors.cu", tmp_path).items()
            if "sketch_kernel" in name}
    assert len(sass) == 5, list(sass)  # hidden bf16/f16 x out in their dtype or f32, and f32 -> f32
    for name, body in sass.items():
        assert re.search(r"\bHMMA\.16816\.F32", body), name  # mma.sync, float32 accumulation
        assert not re.search(r"\b(LDL|STL)\b", body), name
