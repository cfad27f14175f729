"""Round-to-nearest: fit each group's parameters from its own weights and round."""

from __future__ import annotations

import torch

from quantkit.grids import Grid, QuantizedWeight
from quantkit.methods.base import Method, grouped


class RoundToNearest(Method):
    name = "rtn"
    needs_statistics = False

    def quantize_weight(self, weight: torch.Tensor, grid: Grid, stats: object | None = None) -> QuantizedWeight:
        reason = grid.check_shape("weight", tuple(weight.shape))
        if reason:
            raise ValueError(reason)
        groups = grouped(weight.float(), grid)
        params = grid.fit(groups)
        codes = grid.encode(groups, params).reshape(weight.shape)
        return QuantizedWeight(codes=codes, params=params, grid=grid)
