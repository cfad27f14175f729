"""Hugging Face GPTQ (v1) checkpoints, as transformers (with gptqmodel + optimum) and vLLM load them.

The folder is the source checkpoint's with each quantized linear's ``weight`` replaced by
``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` (see quantkit.packing), other tensors in fp16,
``quantization_config`` in config.json, and the tokenizer and generation config copied. It is
checked by loading it with transformers and scoring the logits of that model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.grids import PER_TENSOR, IntGrid, QuantizedWeight
from quantkit.packing import pack_along_columns, pack_along_rows
from quantkit.targets.base import ExportContext, ExportReport
from quantkit.targets.hf_checkpoint import HFCheckpointTarget, unsigned_codes_and_zeros, write_quantized_checkpoint

PACKABLE_BITS = (2, 4, 8)


def gptq_tensors(qw: QuantizedWeight, group_size: int) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales and g_idx of one linear in the GPTQ v1 layout."""
    rows, cols = qw.shape
    codes, zeros = unsigned_codes_and_zeros(qw)
    if qw.g_idx is not None:
        g_idx = qw.g_idx.to(torch.int32)
    else:
        group = cols if group_size <= 0 else group_size
        g_idx = (torch.arange(cols) // group).to(torch.int32)
    bits = qw.grid.bits
    return {
        "qweight": pack_along_rows(codes.T.contiguous(), bits),
        "qzeros": pack_along_columns((zeros - 1).T.contiguous(), bits),
        "scales": qw.params.scale[..., 0].T.contiguous().to(torch.float16),
        "g_idx": g_idx,
    }


class HFGPTQTarget(HFCheckpointTarget):
    kind = "hf-gptq"

    def validate(self, ctx: ExportContext) -> None:
        grid = self.grid(ctx.recipe)
        if grid.bits not in PACKABLE_BITS:
            raise QuantkitError(f"hf-gptq stores {', '.join(map(str, PACKABLE_BITS))}-bit weights; "
                                f"--bits {grid.bits} cannot be packed (use a GGUF target or 4 bits)")
        if grid.group_size == PER_TENSOR:
            raise QuantkitError("hf-gptq has no per-tensor scales; use --group-size -1 (per channel) or a group size")
        if ctx.recipe.quantize_embeddings:
            raise QuantkitError("hf-gptq cannot store a quantized token embedding; drop --quantize-embeddings")
        per_word = 32 // grid.bits
        for name in ctx.quantized_names:
            rows, cols = ctx.source.tensors[name].shape
            if rows % per_word or cols % per_word:
                raise QuantkitError(f"hf-gptq packs {per_word} {grid.bits}-bit codes per int32: {name} ({rows}x{cols}) "
                                    f"needs both dimensions divisible by {per_word}; use more bits or --exclude it")

    def export(self, ctx: ExportContext, path: Path) -> ExportReport:
        grid: IntGrid = self.grid(ctx.recipe)
        return write_quantized_checkpoint(ctx, path, grid, lambda qw: gptq_tensors(qw, grid.group_size), {
            "quant_method": "gptq",
            "bits": grid.bits,
            "group_size": grid.group_size,
            "desc_act": ctx.recipe.gptq_g_idx,
            "sym": grid.symmetric,
            "damp_percent": ctx.recipe.damp_percent,
            "true_sequential": True,
            "static_groups": ctx.recipe.method == "gptq" and (ctx.recipe.act_order == "static"
                                                              or ctx.recipe.static_groups),
            "checkpoint_format": "gptq",
            "pack_dtype": "int32",
            "lm_head": ctx.source.arch.lm_head in ctx.quantized_names,
        })
