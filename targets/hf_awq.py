"""Hugging Face AWQ (GEMM) checkpoints, as transformers (with gptqmodel + optimum) and vLLM load them.

Quantized linears become ``qweight`` / ``qzeros`` / ``scales`` in the AWQ GEMM layout (see
quantkit.packing); the norms AWQ rescaled are stored rescaled. 4-bit, group-wise, no act-order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.grids import IntGrid, QuantizedWeight
from quantkit.packing import AWQ_ORDER, pack_along_columns
from quantkit.targets.base import ExportContext, ExportReport
from quantkit.targets.hf_checkpoint import HFCheckpointTarget, unsigned_codes_and_zeros, write_quantized_checkpoint


def awq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    if qw.g_idx is not None:
        raise QuantkitError("hf-awq cannot store act-order groups; drop --act-order")
    codes, zeros = unsigned_codes_and_zeros(qw)
    return {
        "qweight": pack_along_columns(codes.T.contiguous(), 4, AWQ_ORDER),
        "qzeros": pack_along_columns(zeros.T.contiguous(), 4, AWQ_ORDER),
        "scales": qw.params.scale[..., 0].T.contiguous().to(torch.float16),
    }


class HFAWQTarget(HFCheckpointTarget):
    kind = "hf-awq"

    def validate(self, ctx: ExportContext) -> None:
        grid = self.grid(ctx.recipe)
        if grid.bits != 4 or grid.group_size <= 0:
            raise QuantkitError(f"hf-awq stores 4-bit group-wise weights; got --bits {grid.bits} --group-size "
                                f"{grid.group_size} (use --bits 4 --group-size 128)")
        if ctx.recipe.gptq_g_idx:
            raise QuantkitError("hf-awq cannot store act-order groups (g_idx); use --act-order static or off")
        if ctx.recipe.quantize_embeddings or ctx.recipe.quantize_lm_head:
            raise QuantkitError("hf-awq quantizes block linears only; drop --quantize-embeddings/--quantize-lm-head")

    def export(self, ctx: ExportContext, path: Path) -> ExportReport:
        grid: IntGrid = self.grid(ctx.recipe)
        return write_quantized_checkpoint(ctx, path, grid, awq_tensors, {
            "quant_method": "awq",
            "bits": 4,
            "group_size": grid.group_size,
            "version": "gemm",
            "zero_point": True,
        })
