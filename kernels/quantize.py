"""Group-wise round-to-nearest in one pass: absmax (symmetric) or zero-point (asymmetric) per group
of consecutive weights in a row, exactly as quantkit.grids.IntGrid defines them (its RTN is the
reference). Used for round-to-nearest on a GPU.

One program handles BLOCK_ROWS rows of one group: it reads the group, reduces min/max, writes the
group's scale (and zero point) and the codes. Rounding is half to even, as torch.round.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.grids import IntGrid, QuantizedWeight, QuantParams


@triton.jit
def _round_half_even(y):
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _groupwise_kernel(w_ptr, codes_ptr, scale_ptr, zero_ptr, ROWS, COLS, N_GROUPS,
                      QMIN: tl.constexpr, QMAX: tl.constexpr, MIN_ZERO: tl.constexpr, SYMMETRIC: tl.constexpr,
                      GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    mask = rows[:, None] < ROWS
    w = tl.load(w_ptr + rows[:, None] * COLS + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        scale = tl.max(tl.abs(w), axis=1) / (QMAX + 0.5)
        scale = tl.where(scale > 0, scale, 1.0)
        q = _round_half_even(w / scale[:, None])
    else:
        lo = tl.minimum(tl.min(w, axis=1), 0.0)
        hi = tl.maximum(tl.max(w, axis=1), 0.0)
        scale = (hi - lo) / QMAX
        scale = tl.where(scale > 0, scale, 1.0)
        zero = tl.minimum(tl.maximum(_round_half_even(-lo / scale), MIN_ZERO), QMAX)
        tl.store(zero_ptr + rows * N_GROUPS + group, zero, mask=rows < ROWS)
        q = _round_half_even(w / scale[:, None]) + zero[:, None]
    q = tl.minimum(tl.maximum(q, QMIN), QMAX)
    tl.store(scale_ptr + rows * N_GROUPS + group, scale, mask=rows < ROWS)
    tl.store(codes_ptr + rows[:, None] * COLS + cols[None, :], q.to(tl.int32), mask=mask)


def quantize_groupwise(weight: torch.Tensor, grid: IntGrid, block_rows: int = 16) -> QuantizedWeight:
    """Triton round-to-nearest of a (rows, cols) weight on a group-wise IntGrid."""
    if grid.group_size <= 0 or grid.fp16_scales:
        raise ValueError("the kernel handles positive group sizes with fp32 scales; use RoundToNearest otherwise")
    rows, cols = weight.shape
    if cols % grid.group_size:
        raise ValueError(f"group size {grid.group_size} does not divide the row length {cols}")
    if grid.group_size & (grid.group_size - 1):
        raise ValueError(f"group size {grid.group_size} must be a power of two for the kernel")
    n_groups = cols // grid.group_size
    w = weight.contiguous()
    codes = torch.empty(rows, cols, dtype=torch.int32, device=w.device)
    scale = torch.empty(rows, n_groups, dtype=torch.float32, device=w.device)
    zero = torch.empty(rows, n_groups, dtype=torch.float32, device=w.device)
    launch = (triton.cdiv(rows, block_rows), n_groups)
    _groupwise_kernel[launch](w, codes, scale, zero, rows, cols, n_groups, QMIN=grid.qmin, QMAX=grid.qmax,
                              MIN_ZERO=grid.min_zero, SYMMETRIC=grid.symmetric, GROUP=grid.group_size,
                              BLOCK_ROWS=block_rows)
    params = QuantParams(scale=scale[..., None], zero=None if grid.symmetric else zero[..., None])
    return QuantizedWeight(codes=codes, params=params, grid=grid)
