"""Hugging Face AWQ (GEMM) checkpoints, as transformers (with gptqmodel + optimum) and vLLM load them.

Quantized linears become ``qweight`` / ``qzeros`` / ``scales`` in the AWQ GEMM layout (see
quantkit.packing); the norms AWQ rescaled are stored rescaled. 4-bit, group-wise, no act-order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.grids import Grid, IntGrid, QuantizedWeight
from quantkit.packing import AWQ_ORDER, pack_along_columns
from quantkit.recipe import Recipe
from quantkit.targets.base import ExportContext, Target
from quantkit.targets.hf_gptq import HFGPTQTarget, hf_logits, unsigned_codes_and_zeros, write_quantized_checkpoint


def awq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    if qw.g_idx is not None:
        raise QuantkitError("hf-awq cannot store act-order groups; drop --act-order")
    codes, zeros = unsigned_codes_and_zeros(qw)
    return {
        "qweight": pack_along_columns(codes.T.contiguous(), 4, AWQ_ORDER),
        "qzeros": pack_along_columns(zeros.T.contiguous(), 4, AWQ_ORDER),
        "scales": qw.params.scale[..., 0].T.contiguous().to(torch.float16),
    }


class HFAWQTarget(Target):
    kind = "hf-awq"

    def __init__(self, option: str | None):
        if option:
            raise QuantkitError(f"hf-awq takes no option (got {option!r}); set the group size with --group-size")
        super().__init__(None)

    def grid(self, recipe: Recipe) -> Grid:
        return recipe.int_grid()

    def bits_per_weight(self, recipe: Recipe) -> float:
        return self.grid(recipe).bits_per_weight()

    def filename(self) -> str:
        return "hf-awq"

    def runtime(self) -> dict:
        return HFGPTQTarget(None).runtime()

    def validate(self, ctx: ExportContext) -> None:
        grid = self.grid(ctx.recipe)
        if grid.bits != 4 or grid.group_size <= 0:
            raise QuantkitError(f"hf-awq stores 4-bit group-wise weights; got --bits {grid.bits} --group-size "
                                f"{grid.group_size} (use --bits 4 --group-size 128)")
        if ctx.recipe.act_order:
            raise QuantkitError("hf-awq cannot store act-order groups; drop --act-order")
        if ctx.recipe.quantize_embeddings or ctx.recipe.quantize_lm_head:
            raise QuantkitError("hf-awq quantizes block linears only; drop --quantize-embeddings/--quantize-lm-head")

    def export(self, ctx: ExportContext, path: Path) -> None:
        grid: IntGrid = self.grid(ctx.recipe)
        write_quantized_checkpoint(ctx, path, grid, awq_tensors, {
            "quant_method": "awq",
            "bits": 4,
            "group_size": grid.group_size,
            "version": "gemm",
            "zero_point": True,
        })

    def logits(self, path: Path, ids: torch.Tensor, progress: bool = True) -> Iterator[np.ndarray]:
        return hf_logits(path, ids, progress)
