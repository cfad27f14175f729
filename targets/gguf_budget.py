"""A GGUF file under a size budget (``--target-bpw`` / ``--max-size``): the file type's plan with each
block matrix's type replaced by the allocation of ``quantkit.budget``. Embedding, output, norms and
stacked experts keep the file type's types; they are the budget's fixed part."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch

from quantkit.budget import Allocation, BudgetFrame, aligned, allocate, matrix_options, plot_sensitivity
from quantkit.errors import QuantkitError
from quantkit.grids import GGUF_GRIDS, GGUF_TYPES, ggml_lib
from quantkit.recipe import Recipe

GGMLType = gguf.GGMLQuantizationType


# Candidate types by row length: k-quants and IQ4_XS need rows in 256s; legacy blocks and IQ4_NL in 32s
CANDIDATES_256 = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
CANDIDATES_32 = ("Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def candidates(row_length: int) -> tuple[str, ...]:
    if row_length % 256 == 0:
        return CANDIDATES_256
    if row_length % 32 == 0:
        return CANDIDATES_32
    return ()


@dataclass(frozen=True)
class GGUFCandidate:
    """A GGUF type as a budget candidate: rounded (with the importance, as the file will be) and decoded by ggml."""

    name: str

    def nbytes(self, shape: tuple[int, int]) -> int:
        return aligned(GGUF_TYPES[self.name].row_bytes(shape[1]) * shape[0])

    def round_trip(self, chunk: torch.Tensor, importance: torch.Tensor) -> np.ndarray:
        raw = GGUF_GRIDS[self.name].round_to_bytes(chunk, importance)
        return ggml_lib.dequantize_rows(self.name, raw, chunk.shape[1])


def _row_options(t) -> tuple[str, ...]:
    return candidates(t.shape[-1])


def frame(plan, block_linears: list, header: int) -> BudgetFrame:
    """Every tensor but the movable block matrices is fixed; bits per weight count all the file's tensors (llama.cpp's
    figure), the size the header too."""
    movable = tuple(t for t in block_linears if not t.parts and _row_options(t))
    names = {t.gguf_name for t in movable}
    fixed = sum(aligned(t.nbytes()) for t in plan if t.gguf_name not in names)
    elements = sum(int(np.prod(t.shape)) for t in plan)
    sizes = [[GGUFCandidate(c).nbytes(t.shape) for c in _row_options(t)] for t in movable]
    return BudgetFrame(movable, low=sum(min(s) for s in sizes), high=sum(max(s) for s in sizes), size_fixed=fixed,
                       header=header, bpw_fixed=fixed, bpw_elements=elements)


def allocate_plan(plan, budget: BudgetFrame, recipe: Recipe, quantizer, source, progress: bool = False):
    """The plan with the budget's types, and the allocation."""
    from tqdm import tqdm

    options = {}
    for t in tqdm(budget.movable, desc="budget: error per candidate type", unit="matrix", disable=not progress,
                  leave=False):
        importance = quantizer.importance(t.hf_name)
        if importance is None:
            raise QuantkitError("a size budget needs calibration text to predict each type's loss; it was not loaded")
        rows = (chunk for _, chunk in source.row_chunks(t.hf_name))
        shape = (int(t.shape[0]), int(t.shape[1]))
        options[t.gguf_name] = matrix_options(rows, importance, shape, [GGUFCandidate(c) for c in _row_options(t)])
    allocation = allocate(options, budget.budget_bytes(recipe))
    typed = {n: GGMLType[k] for n, k in allocation.types.items()}
    tensors = tuple(replace(t, ggml_type=typed[t.gguf_name], grid=GGUF_GRIDS[typed[t.gguf_name].name])
                    if t.gguf_name in typed else t for t in plan)
    return replace(plan, tensors=tensors), allocation


def plot(allocation: Allocation, n_layers: int, path: Path) -> str | None:
    """The sensitivity plot; matrices are named ``blk.N.*``."""
    return plot_sensitivity(allocation, n_layers, lambda name: int(name.split(".")[1]), path)
