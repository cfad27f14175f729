"""A GGUF file under a size budget (``--target-bpw`` / ``--max-size``): the file type's plan with each
block matrix's type replaced by the allocation of ``quantkit.budget``. Embedding, output, norms and
stacked experts keep the file type's types; they are the budget's fixed part."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

from quantkit.budget import Allocation, aligned, allocate, candidates, parse_size
from quantkit.errors import QuantkitError
from quantkit.grids import GGUF_GRIDS, GGUF_TYPES
from quantkit.recipe import Recipe

GGMLType = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class BudgetFrame:
    """What a budget leaves to the matrices it types."""

    movable: tuple  # PlannedTensor of the matrices whose type the budget chooses
    fixed: int  # aligned bytes of every other tensor
    header: int  # bytes before the tensor data (metadata, tensor infos, padding)
    elements: int  # weights in the file, all tensors
    low: int  # the movable matrices' bytes at their smallest candidates
    high: int  # ... at their largest

    def budget_bytes(self, recipe: Recipe) -> int:
        """Bytes the budget allows the movable matrices."""
        if recipe.target_bpw is not None:  # llama.cpp's bits per weight: tensor data over all weights
            return int(recipe.target_bpw * self.elements / 8) - self.fixed
        return parse_size(recipe.max_size) - self.header - self.fixed

    def check(self, recipe: Recipe, name: str) -> None:
        left = self.budget_bytes(recipe)
        if self.low <= left <= self.high:
            return
        if recipe.target_bpw is not None:
            lo, hi = ((self.fixed + b) * 8 / self.elements for b in (self.low, self.high))
            raise QuantkitError(f"--target-bpw {recipe.target_bpw} is outside what {name} can reach for this model: "
                                f"{lo:.3f} to {hi:.3f} bits per weight; pick a budget in that range")
        lo, hi = (self.header + self.fixed + b for b in (self.low, self.high))
        raise QuantkitError(f"--max-size {recipe.max_size} is outside what {name} can reach for this model: "
                            f"{lo} to {hi} bytes ({lo / 1e6:.2f} to {hi / 1e6:.2f} MB); pick a size in that range")


def _row_options(t) -> tuple[str, ...]:
    return candidates(t.shape[-1])


def frame(plan, block_linears: list, header: int) -> BudgetFrame:
    movable = tuple(t for t in block_linears if not t.parts and _row_options(t))
    names = {t.gguf_name for t in movable}
    fixed = sum(aligned(t.nbytes()) for t in plan if t.gguf_name not in names)
    elements = sum(int(np.prod(t.shape)) for t in plan)
    sizes = [[aligned(GGUF_TYPES[c].row_bytes(t.shape[-1]) * t.shape[0]) for c in _row_options(t)] for t in movable]
    return BudgetFrame(movable, fixed, header, elements, sum(min(s) for s in sizes), sum(max(s) for s in sizes))


def allocate_plan(plan, budget: BudgetFrame, recipe: Recipe, quantizer, source, progress: bool = False):
    """The plan with the budget's types, and the allocation."""
    from tqdm import tqdm

    from quantkit.budget import matrix_options

    options = {}
    for t in tqdm(budget.movable, desc="budget: error per candidate type", unit="matrix", disable=not progress,
                  leave=False):
        importance = quantizer.importance(t.hf_name)
        if importance is None:
            raise QuantkitError("a size budget needs calibration text to predict each type's loss; it was not loaded")
        rows = (chunk for _, chunk in source.row_chunks(t.hf_name))
        options[t.gguf_name] = matrix_options(rows, importance, _row_options(t))
    allocation = allocate(options, budget.budget_bytes(recipe))
    typed = {n: GGMLType[k] for n, k in allocation.types.items()}
    tensors = tuple(replace(t, ggml_type=typed[t.gguf_name], grid=GGUF_GRIDS[typed[t.gguf_name].name])
                    if t.gguf_name in typed else t for t in plan)
    return replace(plan, tensors=tensors), allocation


def report(allocation: Allocation, budget: BudgetFrame, recipe: Recipe, plot: str | None) -> tuple[str, dict]:
    """A note for the run's report and the manifest's ``budget`` entry."""
    counts = Counter(allocation.types.values())
    spread = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: GGUF_TYPES[kv[0]].bits_per_weight))
    data = budget.fixed + allocation.nbytes
    bpw = data * 8 / budget.elements
    note = (f"budget {recipe.budget_label()}: {len(allocation.types)} block matrices typed by predicted loss "
            f"({spread}); {data + budget.header} bytes, {bpw:.3f} bits per weight")
    entry = {"budget": recipe.budget_label(), "bytes": data + budget.header, "bits_per_weight": round(bpw, 4),
             "reachable_bytes": [budget.header + budget.fixed + budget.low, budget.header + budget.fixed + budget.high],
             "predicted_error": allocation.predicted_error,
             "predicted_error_means": "sum over matrices of sum_j E[x_j^2] (W - Q(W))_ij^2 (activation-weighted "
                                      "squared rounding error), in the model's units",
             "types": allocation.types, "counts": dict(sorted(counts.items())),
             "errors": {n: {o.type_name: o.error for o in opts} for n, opts in allocation.options.items()},
             "plot": plot}
    return note, entry


def plot_sensitivity(allocation: Allocation, n_layers: int, path: Path) -> str | None:
    """Per layer: the predicted error of each candidate type (summed over the layer's matrices) and the bits the
    allocation gave the layer. Returns the file name, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    per_type: dict[str, np.ndarray] = {}
    bits, weights = np.zeros(n_layers), np.zeros(n_layers)
    for name, opts in allocation.options.items():
        layer = int(name.split(".")[1])
        for o in opts:
            per_type.setdefault(o.type_name, np.zeros(n_layers))[layer] += o.error
        chosen = next(o for o in opts if o.type_name == allocation.types[name])
        bits[layer] += chosen.nbytes * 8
        weights[layer] += chosen.nbytes * 8 / GGUF_TYPES[chosen.type_name].bits_per_weight
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    layers = np.arange(n_layers)
    for type_name, errors in sorted(per_type.items(), key=lambda kv: GGUF_TYPES[kv[0]].bits_per_weight):
        top.semilogy(layers, np.maximum(errors, 1e-30), marker=".", label=type_name)
    top.set_ylabel("predicted error (activation-weighted)")
    top.set_title("Sensitivity per layer: rounding error of each candidate type")
    top.legend(ncol=4, fontsize=8)
    bottom.bar(layers, np.divide(bits, weights, out=np.zeros(n_layers), where=weights > 0))
    bottom.set_ylabel("allocated bits per weight")
    bottom.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
