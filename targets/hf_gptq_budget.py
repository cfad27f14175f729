"""An hf-gptq folder under a size budget (``--target-bpw`` / ``--max-size``): each block linear stored at the
bit width (2, 4 or 8) and group size (the recipe's, or half of it down to 32) that the allocation of
``quantkit.budget`` gives it, written as GPTQModel's ``dynamic`` per-module overrides beside the default ``bits``
and ``group_size``.

Accounting: ``--target-bpw`` is over the quantized linears' weights, their scales, zero points and g_idx
included (the figure GPTQ/EXL2 users quote; embeddings stay fp16 in this format and would swamp it);
``--max-size`` is the bytes of the weight files (``*.safetensors``), headers included. Widths below ``--bits`` are
candidates only for a budget that cannot hold every block linear at ``--bits``: above that, the budget only buys
upgrades (on SmolLM2, 2-bit matrices traded for 8-bit ones predicted a gain and measured a loss).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from quantkit.budget import Allocation, BudgetFrame, allocate, matrix_options, plot_sensitivity
from quantkit.errors import QuantkitError
from quantkit.grids import IntGrid
from quantkit.methods.rtn import RoundToNearest
from quantkit.sequential import GridPlan
from quantkit.targets.base import ExportContext

PACKABLE_BITS = (2, 4, 8)
FLOAT_BYTES = 2  # every tensor that is not a quantized linear is stored in fp16
HEADER_ENTRY_BOUND = 160  # bytes of one tensor's safetensors header entry beyond its name (20-digit numbers)
FILE_OVERHEAD_BOUND = 64  # the length prefix, metadata and padding of one safetensors file


def packs(bits: int, shape: tuple[int, int]) -> bool:
    """Whether GPTQ v1 can pack a ``shape`` matrix at ``bits``: both dimensions in whole int32 words."""
    per_word = 32 // bits
    return shape[0] % per_word == 0 and shape[1] % per_word == 0


@dataclass(frozen=True)
class IntCandidate:
    """An integer grid as a budget candidate: its GPTQ v1 storage, rounded to nearest in torch."""

    grid: IntGrid

    @property
    def name(self) -> str:
        return self.grid.name

    def nbytes(self, shape: tuple[int, int]) -> int:
        rows, cols = shape
        groups = 1 if self.grid.group_size <= 0 else -(-cols // self.grid.group_size)
        bits = self.grid.bits
        qweight, qzeros = rows * cols * bits // 8, groups * rows * bits // 8
        return qweight + qzeros + groups * rows * FLOAT_BYTES + cols * 4  # + scales (fp16) + g_idx (int32)

    def round_trip(self, chunk: torch.Tensor, importance: torch.Tensor) -> np.ndarray:
        return RoundToNearest().quantize_weight(chunk.float(), self.grid).dequantize().numpy()


MIN_GROUP = 32  # the smallest group a budget offers (GPTQ checkpoints commonly use 32 to 128)


def group_sizes(default: IntGrid, columns: int) -> list[int]:
    """The recipe's group size and, where it leaves a group of at least MIN_GROUP dividing the rows, half of it:
    smaller groups are the other way to spend bytes (measured on SmolLM2: at equal bytes, g32 beat g64 + 8-bit
    upgrades)."""
    sizes = [default.group_size]
    half = default.group_size // 2
    if default.group_size > 0 and half >= MIN_GROUP and columns % half == 0:
        sizes.append(half)
    return sizes


def candidates(default: IntGrid, shape: tuple[int, int], floor: int = 0) -> list[IntCandidate]:
    """Every packable width from ``floor`` bits up, at each of ``group_sizes``."""
    return [IntCandidate(replace(default, bits=b, group_size=g)) for b in PACKABLE_BITS if b >= floor and
            packs(b, shape) for g in group_sizes(default, shape[1])]


def _shape(ctx: ExportContext, name: str) -> tuple[int, int]:
    rows, cols = ctx.source.tensors[name].shape
    return int(rows), int(cols)


def block_linears(ctx: ExportContext) -> list[str]:
    source = ctx.source
    quantized = set(ctx.quantized_names)
    return [n for i in range(source.n_layers) for n in source.arch.linear_weights(i) if n in quantized]


def frame(ctx: ExportContext, default: IntGrid, max_shard_bytes: int) -> BudgetFrame:
    """The quantized block linears are movable; a quantized lm_head keeps the default grid."""
    movable = tuple(block_linears(ctx))
    moving = set(movable)
    quantized = set(ctx.quantized_names)
    fixed_quantized = sum(IntCandidate(default).nbytes(_shape(ctx, n)) for n in quantized - moving)
    floats = sum(int(np.prod(t.shape)) * FLOAT_BYTES for n, t in ctx.source.tensors.items() if n not in quantized)
    sizes = [[c.nbytes(_shape(ctx, n)) for c in candidates(default, _shape(ctx, n))] for n in movable]
    low, high = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
    elements = sum(int(np.prod(ctx.source.tensors[n].shape)) for n in quantized)
    return BudgetFrame(movable, low=low, high=high, size_fixed=fixed_quantized + floats,
                       header=_header_bound(ctx, fixed_quantized + floats + high, max_shard_bytes),
                       bpw_fixed=fixed_quantized, bpw_elements=elements)


def _header_bound(ctx: ExportContext, data_bytes: int, max_shard_bytes: int) -> int:
    """At least the bytes the weight files hold beside tensor data: one header entry per stored tensor (a quantized
    linear stores four), and one file overhead per shard (a shard holds at least half of the shard limit, or one
    tensor)."""
    rename = ctx.source.arch.checkpoint_name
    quantized = set(ctx.quantized_names)
    entries = 0
    for name in ctx.source.tensors:
        stored = rename(name)
        if name in quantized:
            prefix = stored.removesuffix(".weight")
            entries += sum(len(f"{prefix}.{k}") + HEADER_ENTRY_BOUND for k in ("qweight", "qzeros", "scales", "g_idx"))
        else:
            entries += len(stored) + HEADER_ENTRY_BOUND
    files = min(len(ctx.source.tensors), 1 + 2 * data_bytes // max_shard_bytes)
    return entries + files * FILE_OVERHEAD_BOUND


def allocate_grids(ctx: ExportContext, budget: BudgetFrame, default: IntGrid) -> tuple[GridPlan, Allocation]:
    """The grid of every block linear under the budget, and the allocation."""
    from tqdm import tqdm

    allowed = budget.budget_bytes(ctx.recipe)
    floor = default.bits if allowed >= sum(IntCandidate(default).nbytes(_shape(ctx, n)) for n in budget.movable) else 0
    options, grids = {}, {}
    for name in tqdm(budget.movable, desc="budget: error per bit width", unit="matrix", disable=not ctx.progress,
                     leave=False):
        importance = ctx.quantizer.importance(name)
        if importance is None:
            raise QuantkitError("a size budget needs calibration text to predict each width's loss; it was not loaded")
        shape = _shape(ctx, name)
        # no matrix goes below --bits to pay for another's upgrade while every one fits at --bits: measured on
        # SmolLM2 (benchmarks/results/budget_hf.md), such 2-bit trades cost far more than the proxy predicts
        found = candidates(default, shape, floor)
        grids.update({c.name: c.grid for c in found})
        rows = (chunk for _, chunk in ctx.source.row_chunks(name))
        options[name] = matrix_options(rows, importance, shape, found)
    allocation = allocate(options, allowed)
    overrides = tuple((n, grids[t]) for n, t in sorted(allocation.types.items()) if grids[t] != default)
    return GridPlan(default, overrides), allocation


def dynamic_config(plan: GridPlan, checkpoint_name) -> dict[str, dict[str, int]]:
    """GPTQModel's ``dynamic``: one positive rule per (bits, group size) other than the default, matching exactly the
    modules stored at it (``+:^(a|b)$``), giving what differs from the default."""
    by_layout: dict[tuple[int, int], list[str]] = {}
    for name, grid in plan.overrides:
        module = re.escape(checkpoint_name(name).removesuffix(".weight"))
        by_layout.setdefault((grid.bits, grid.group_size), []).append(module)
    rules = {}
    for (bits, group_size), modules in sorted(by_layout.items()):
        override = {"bits": bits}
        if group_size != plan.default.group_size:
            override["group_size"] = group_size
        rules[f"+:^({'|'.join(modules)})$"] = override
    return rules


def plot(allocation: Allocation, n_layers: int, path: Path) -> str | None:
    """The sensitivity plot; matrices are named by their checkpoint names (``model.layers.N.*``)."""
    return plot_sensitivity(allocation, n_layers, lambda name: int(re.search(r"\.(\d+)\.", name).group(1)), path)
