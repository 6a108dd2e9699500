"""Deterministic two-stage row reductions: how rows are split into groups, and the fixed-order
sum of the per-group partials; with a process group, the local sums at each reduction point
of the fused call (_local_sums_kernel).

A kernel that sums over tokens gives each program a *group* of consecutive rows, sums its rows
in float32 in a fixed order and writes one partial row; ``sum_partials`` then adds the
partials in group order. The split depends only on N (never on the GPU's SM count), so two
calls give bitwise the same sums, on any GPU, and no float atomics are used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ._common import SLOTS, sum_slots

MAX_GROUPS = 512  # at most this many partial rows per reduction (bounds the partial buffer)


def row_groups(n_rows: int, block_rows: int):
    """-> (rows_per_group, n_groups): consecutive rows per program, a multiple of block_rows,
    at most MAX_GROUPS groups (read at call time, so tests can force multi-tile groups).

    Rows n_groups * rows_per_group >= n_rows; the last group may be partial (kernels mask)."""
    n_blocks = max(1, triton.cdiv(n_rows, block_rows))
    blocks_per_group = triton.cdiv(n_blocks, MAX_GROUPS)
    rows_per_group = blocks_per_group * block_rows
    return rows_per_group, max(1, triton.cdiv(n_rows, rows_per_group))


# 256 columns per program (fewer for narrow rows), partial rows added 32 at a time, 4 warps: 64 registers,
# no spills, 8 CTAs/SM (AOT table, benchmarks/results/aot_sm90.md). Also the local sums' tiles.
SUM_PARTIALS = dict(BLOCK_G=32, BLOCK_C=256, num_warps=4)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n_groups, n_cols,
                         BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] = sum_g partial[g, c]: tiles of BLOCK_G groups summed by a fixed tree, tiles added
    in group order. partial [G, C] float32, out [C] float32."""
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for g0 in range(0, n_groups, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
        tile = tl.load(partial_ptr + g[:, None] * n_cols + cols[None, :],
                       mask=(g[:, None] < n_groups) & cmask[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + cols, acc, mask=cmask)


def sum_partials(partial: torch.Tensor) -> torch.Tensor:
    """partial [G, ...] float32 contiguous -> [...] float32, summed over G in a fixed order."""
    n_groups = partial.shape[0]
    out = empty(*partial.shape[1:], dtype=torch.float32, device=partial.device)
    n_cols = out.numel()
    block_c = min(SUM_PARTIALS["BLOCK_C"], triton.next_power_of_2(max(n_cols, 16)))
    _sum_partials_kernel[(triton.cdiv(n_cols, block_c),)](partial_ptr=partial, out_ptr=out, n_groups=n_groups,
                                                          n_cols=n_cols, **dict(SUM_PARTIALS, BLOCK_C=block_c))
    return out


@triton.jit
def _local_sums_kernel(partial_ptr, n_groups, stat_ptr, n_stat_groups, out_ptr, n_cols,
                       BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """One reduction point of the process-group path: this rank's partials added into one row,
    in the orders the finalize kernels use, for one all_reduce. Programs 0..T-1 (column tiles):
    out[:C] = the rows of partial [G, C] in group order (float32, as _centroids_kernel's sums);
    program T: out[C:C + SLOTS] = sum_slots of stat [Gs, SLOTS]. out [C + SLOTS] float32."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_cols, BLOCK_C)
    if pid < n_tiles:
        cols = pid.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < n_cols
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for g0 in range(0, n_groups, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
            acc += tl.sum(tl.load(partial_ptr + g[:, None] * n_cols + cols[None, :],
                                  mask=(g < n_groups)[:, None] & cmask[None, :], other=0.0), axis=0)
        tl.store(out_ptr + cols, acc, mask=cmask)
    else:
        slot = tl.arange(0, SLOTS)
        tl.store(out_ptr + n_cols + slot, sum_slots(stat_ptr, n_stat_groups, BLOCK_G))
