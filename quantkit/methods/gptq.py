"""GPTQ: quantize columns one at a time and spread each column's rounding error over the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

Works on any grid: the grid fits a group's parameters when the sweep reaches the group's first
column (on weights already corrected for earlier errors) and rounds each column on them (a k-quant
column on its sub-block's scale and minimum). With ``static_groups`` the parameters are fitted on
the original weights before the sweep. With ``weighted_fit`` grids that have an importance-weighted
search (GGUF's) fit on the Hessian diagonal, the mean squared input of each column: the quantity
llama.cpp's importance matrix holds.
``act_order`` sweeps columns by decreasing Hessian diagonal; on grids whose groups must be
consecutive columns (GGUF blocks) it implies static groups, elsewhere groups follow the sweep order
and are recorded in ``g_idx``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from quantkit.calibrate import LinearStats
from quantkit.errors import QuantkitError
from quantkit.grids import PER_TENSOR, Grid, QuantizedWeight, QuantParams
from quantkit.methods.base import Method, grouped
from quantkit.methods.options import build_config

MAX_DAMP = 1.0  # retries multiply the damping by 10 up to this fraction of the mean diagonal


@dataclass(frozen=True)
class GPTQConfig:
    damp_percent: float = 0.01  # damping added to the Hessian diagonal, as a fraction of its mean
    block_size: int = field(default=128, metadata={
        "help": "columns updated eagerly before a lazy batch update of the rest (speed only)"})
    act_order: bool = False
    static_groups: bool = False
    # fit group parameters weighting each column's error by the Hessian diagonal (GGUF grids' weighted search)
    weighted_fit: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


class CholeskyRetryWarning(UserWarning):
    """The Hessian needed more damping than asked for."""


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """MKL's Cholesky gives different low bits on 1 and 2 threads, and under MKL's dynamic threading a busy
    machine changes the count between runs, so the same inputs would give different bytes. On one thread
    the factor is the same in every process (that step alone is slower; matrix products, which do not
    depend on the thread count, keep all threads)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def inverse_hessian_factor(hessian: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of the damped inverse Hessian; retries with 10x damping on failure."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = torch.diagonal(hessian).mean()
    damp = damp_percent
    while damp <= MAX_DAMP:
        try:
            with _one_thread():
                lower = torch.linalg.cholesky(hessian + damp * mean_diag * eye)
                factor = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            damp *= 10
            continue
        if damp != damp_percent:
            warnings.warn(f"GPTQ: Cholesky failed with damping {damp_percent:g}; succeeded with {damp:g}",
                          CholeskyRetryWarning, stacklevel=3)
        return factor, damp
    raise QuantkitError(f"GPTQ: the Hessian is not positive definite even with damping {MAX_DAMP:g}; "
                        "use more calibration samples or round-to-nearest")


def _block_columns(group: int, block_size: int, cols: int) -> int:
    """A block size that keeps every group inside one block or every block inside one group."""
    if group >= cols or group % block_size == 0 or block_size % group == 0:
        return block_size
    return group


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, config: GPTQConfig) -> QuantizedWeight:
    """GPTQ on ``grid``; ``hessian`` is ``X^T X`` of the layer's inputs (any positive scale)."""
    w = weight.clone().float()
    h = hessian.to(w.device, dtype=torch.float32, copy=True)
    rows, cols = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    group = grid.group_for(cols)
    n_groups = cols // group
    static = config.static_groups or grid.group_size == PER_TENSOR
    if config.act_order and grid.contiguous_groups_only:
        static = True
    weighted = config.weighted_fit and grid.uses_importance
    importance = torch.diagonal(h).clone() if weighted else None
    static_params = _static_params(w, grid, importance) if static else None

    if config.act_order:
        order = torch.argsort(torch.diagonal(h), descending=True)
    else:
        order = torch.arange(cols, device=w.device)
    w, h = w[:, order], h[order][:, order]
    if importance is not None:
        importance = importance[order]
    u, _ = inverse_hessian_factor(h, config.damp_percent)

    codes = torch.zeros(rows, cols, dtype=torch.int32, device=w.device)
    fitted: list[QuantParams | None] = [None] * n_groups
    sweep_groups = not static and config.act_order and n_groups > 1  # groups follow the sweep: g_idx
    block = _block_columns(group, config.block_size, cols)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            col = start + i
            source_col = col if sweep_groups or not static else int(order[col])
            g, offset = divmod(source_col, group)
            if static:
                params = static_params[g]
            else:
                if col % group == 0:
                    source = w_block[:, i : i + group] if group <= block else w[:, col : col + group]
                    fitted[g] = _fit_group(grid, source, None if importance is None else importance[col : col + group])
                params = fitted[g]
            column_params = grid.column_params(params, offset)
            column = w_block[:, i : i + 1]
            q = grid.encode(column, column_params)
            codes[:, col] = q[:, 0]
            err = (column - grid.decode(q, column_params)) / u_block[i, i]
            w_block[:, i:] -= err * u_block[i : i + 1, i:]
            err_block[:, i : i + 1] = err
        w[:, end:] -= err_block @ u[start:end, end:]

    inverse = torch.argsort(order)
    stacked = QuantParams.stack(static_params if static else fitted, dim=1)
    codes = codes[:, inverse]
    if sweep_groups:
        g_idx = (torch.arange(cols, device=w.device) // group)[inverse]
        return QuantizedWeight(codes=codes, params=stacked, grid=grid, g_idx=g_idx)
    stacked = grid.with_codes(stacked, codes.reshape(stacked.scale.shape[0], n_groups, -1))
    return QuantizedWeight(codes=codes, params=stacked, grid=grid)


def _without_inverse(params: QuantParams) -> QuantParams:
    """Round on the stored (e.g. fp16) scale: GPTQ's error feedback must see the decoded value."""
    return QuantParams(params.scale, params.zero, params.minimum, None, aux=params.aux)


def _fit_group(grid: Grid, source: torch.Tensor, importance: torch.Tensor | None) -> QuantParams:
    """One group's parameters (each ``(rows, ...)``) from its current weights ``(rows, group)``."""
    if importance is None:
        return _without_inverse(grid.fit(source))
    # grids read importance as (n_groups, group) beside weights (rows, n_groups, group)
    return _without_inverse(grid.fit(source[:, None, :], importance[None, :])).map(lambda t: t[:, 0])


def _static_params(w: torch.Tensor, grid: Grid, importance: torch.Tensor | None) -> list[QuantParams]:
    """Parameters of each consecutive group, fitted on the original weights; each ``(rows, ...)``."""
    groups = grouped(w, grid)
    if importance is None:
        fitted = _without_inverse(grid.fit(groups))  # (rows | 1, n_groups, ...)
    else:
        fitted = _without_inverse(grid.fit(groups, importance.reshape(groups.shape[-2:])))
    n_groups = fitted.scale.shape[1]
    return [fitted.map(lambda t, g=g: t[:, g]) for g in range(n_groups)]


class GPTQ(Method):
    name = "gptq"
    needs_statistics = True
    sequential = True

    def __init__(self, config: GPTQConfig | None = None):
        self.config = config or GPTQConfig()

    config_class = GPTQConfig
    # config fields the recipe sets from their own flags (--act-order sets two of them)
    flagged = {"damp_percent": "--damp-percent", "act_order": "--act-order", "static_groups": "--static-groups",
               "weighted_fit": "--weighted-fit"}

    @classmethod
    def from_recipe(cls, recipe) -> GPTQ:
        flags = {"damp_percent": recipe.damp_percent, "act_order": recipe.act_order != "off",
                 "static_groups": recipe.act_order == "static" or recipe.static_groups,
                 "weighted_fit": recipe.weighted_fit}
        return cls(build_config(cls.name, GPTQConfig, flags, recipe.parsed_method_options()))

    def quantize_weight(self, weight: torch.Tensor, grid: Grid, stats: object | None = None) -> QuantizedWeight:
        if not isinstance(stats, LinearStats):
            raise QuantkitError("GPTQ needs calibration statistics for every quantized linear")
        reason = grid.check_shape("weight", tuple(weight.shape))
        if reason:
            raise ValueError(reason)
        return gptq_quantize(weight, stats.gram, grid, self.config)
