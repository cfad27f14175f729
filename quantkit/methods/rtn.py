"""Round-to-nearest: fit each group's parameters from its own weights and round."""

from __future__ import annotations

import torch

from quantkit.grids import PER_TENSOR, Grid, QuantizedWeight
from quantkit.methods.base import Method, grouped


class RoundToNearest(Method):
    name = "rtn"
    needs_statistics = False

    def quantize_weight(self, weight: torch.Tensor, grid: Grid, stats: object | None = None,
                        importance: torch.Tensor | None = None) -> QuantizedWeight:
        """``importance`` (one value per input column, llama.cpp's importance matrix) weights each
        column's error in grids that have a weighted search (GGUF's); others ignore it."""
        reason = grid.check_shape("weight", tuple(weight.shape))
        if reason:
            raise ValueError(reason)
        groups = grouped(weight.float(), grid)
        if importance is not None and grid.group_size != PER_TENSOR:
            if importance.shape != (weight.shape[1],):
                raise ValueError(f"importance has shape {tuple(importance.shape)}; expected ({weight.shape[1]},)")
            params = grid.fit(groups, importance.float().reshape(groups.shape[-2:]))
        else:
            params = grid.fit(groups)
        codes = grid.encode(groups, params).reshape(weight.shape)
        return QuantizedWeight(codes=codes, params=params, grid=grid)
