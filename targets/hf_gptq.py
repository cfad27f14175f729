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
from quantkit.recipe import Recipe
from quantkit.sequential import GridPlan
from quantkit.targets import hf_checkpoint, hf_gptq_budget
from quantkit.targets.base import ExportContext, ExportReport
from quantkit.targets.hf_checkpoint import HFCheckpointTarget, unsigned_codes_and_zeros, write_quantized_checkpoint
from quantkit.targets.hf_gptq_budget import PACKABLE_BITS


def gptq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales and g_idx of one linear in the GPTQ v1 layout (groups of its own grid)."""
    rows, cols = qw.shape
    codes, zeros = unsigned_codes_and_zeros(qw)
    if qw.g_idx is not None:
        g_idx = qw.g_idx.to(torch.int32)
    else:
        group_size = qw.grid.group_size
        group = cols if group_size <= 0 else group_size
        g_idx = (torch.arange(cols) // group).to(torch.int32)
    bits = qw.grid.bits
    return {
        "qweight": pack_along_rows(codes.T.contiguous(), bits),
        "qzeros": pack_along_columns((zeros - 1).T.contiguous(), bits),
        "scales": qw.params.scale[..., 0].T.contiguous().to(torch.float16),
        "g_idx": g_idx,
    }


def gptq_config(ctx: ExportContext, grid: IntGrid) -> dict:
    """config.json's quantization_config of a GPTQ v1 checkpoint on ``grid``."""
    recipe = ctx.recipe
    return {
        "quant_method": "gptq",
        "bits": grid.bits,
        "group_size": grid.group_size,
        "desc_act": recipe.gptq_g_idx,
        "sym": grid.symmetric,
        "damp_percent": recipe.damp_percent,
        "true_sequential": True,
        "static_groups": recipe.method == "gptq" and (recipe.act_order == "static" or recipe.static_groups),
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "lm_head": ctx.source.arch.lm_head in ctx.quantized_names,
    }


class HFGPTQTarget(HFCheckpointTarget):
    kind = "hf-gptq"
    takes_budget = True

    def __init__(self, option: str | None):
        super().__init__(option)
        self._budget_label: str | None = None  # set by configure for --target-bpw / --max-size runs

    def configure(self, recipe: Recipe) -> None:
        super().configure(recipe)
        self._budget_label = recipe.budget_label() if recipe.budgeted else None

    def filename(self) -> str:
        """``hf-gptq``; under a budget ``hf-gptq-4.50bpw``."""
        return f"{self.kind}-{self._budget_label}" if self._budget_label else self.kind

    def runtime(self) -> dict:
        found = super().runtime()
        if self._budget_label and self.checked_by != "quantkit":
            # per-module bits are read by GPTQModel's own loader (transformers + optimum ignore them)
            found["name"] = "gptqmodel (GPTQModel.load over transformers)"
        return found

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
        if ctx.recipe.budgeted:
            self._budget_frame(ctx, grid).check(ctx.recipe, self.name)

    @staticmethod
    def _budget_frame(ctx: ExportContext, grid: IntGrid):
        return hf_gptq_budget.frame(ctx, grid, hf_checkpoint.MAX_SHARD_BYTES)

    def export(self, ctx: ExportContext, path: Path) -> ExportReport:
        grid: IntGrid = self.grid(ctx.recipe)
        plan, budget, notes = None, None, ()
        if ctx.recipe.budgeted:
            plan, budget, notes = self._budgeted(ctx, grid, path)
        config = gptq_config(ctx, grid)
        if plan is not None and plan.overrides:
            config["dynamic"] = hf_gptq_budget.dynamic_config(plan, ctx.source.arch.checkpoint_name)
        report = write_quantized_checkpoint(ctx, path, grid, gptq_tensors, config,
                                            notes=notes, plan=plan)
        if budget is None:
            return report
        budget["bytes_bound"] = budget["bytes"]  # the allocation's bound (header entries at their longest)
        budget["bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))  # measured
        return ExportReport(report.notes, bits_per_weight=budget["bits_per_weight"], budget=budget)

    def _budgeted(self, ctx: ExportContext, grid: IntGrid, path: Path) -> tuple[GridPlan, dict, tuple[str, ...]]:
        """Each block linear's grid under the budget; the manifest entry; the sensitivity plot beside the folder."""
        frame = self._budget_frame(ctx, grid)
        plan, allocation = hf_gptq_budget.allocate_grids(ctx, frame, grid)
        plot = hf_gptq_budget.plot(allocation, ctx.source.n_layers, path.with_name(f"{path.name}.budget.png"))
        note, entry = frame.report(allocation, ctx.recipe, plot)
        entry["bytes_means"] = "bytes of the weight files (*.safetensors), measured after writing"
        entry["bits_per_weight_means"] = "over the quantized linears, scales, zero points and g_idx included"
        return plan, entry, (note,)
