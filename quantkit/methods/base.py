"""What a quantization method is: a rule that picks integer codes on a grid."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from quantkit.grids import PER_TENSOR, Grid, QuantizedWeight


class Method(ABC):
    name: str
    # Methods that need calibration statistics (GPTQ's Hessian, AWQ's activation scales) say so;
    # the pipeline then collects them once per run and hands them to every grid's quantization.
    needs_statistics: bool = False
    # Sequential methods learn from the inputs each layer sees once earlier layers are quantized,
    # so their statistics are gathered layer by layer, per grid (see quantkit.sequential).
    sequential: bool = False
    # the method's typed config (its fields are the --method-option keys) and the fields set by own flags
    config_class: type | None = None
    flagged: dict[str, str] = {}

    @classmethod
    def from_recipe(cls, recipe) -> Method:
        return cls()

    def unsupported(self, grid: Grid) -> str | None:
        """Why this method cannot quantize on ``grid``, or None."""
        return None

    def quantize_block(self, job):
        """Quantize one block (sequential methods). Default: linear by linear, in execution order."""
        from quantkit.sequential import SequentialResult, quantize_linear_by_linear

        return SequentialResult(quantized=quantize_linear_by_linear(job, self.quantize_weight))

    @abstractmethod
    def quantize_weight(self, weight: torch.Tensor, grid: Grid, stats: object | None = None) -> QuantizedWeight:
        """Quantize one ``(out_features, in_features)`` matrix on ``grid``."""


def grouped(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """View a matrix as ``(rows, n_groups, group)``; per-tensor grids see one group of everything."""
    rows, cols = weight.shape
    if grid.group_size == PER_TENSOR:
        return weight.reshape(1, 1, rows * cols)
    group = grid.group_for(cols)
    return weight.reshape(rows, cols // group, group)
