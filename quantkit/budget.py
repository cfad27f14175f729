"""Mixed precision under a size budget: each quantized matrix gets the type that buys the most accuracy per
byte, so the file fits ``--max-size`` (or ``--target-bpw``) with the least predicted loss.

The prediction is each matrix's activation-weighted rounding error at each candidate type,
``sum_j E[x_j^2] * sum_i (W_ij - Q(W)_ij)^2``: the expected squared error the rounding adds to that linear's
output, with ``E[x_j^2]`` the importance matrix (per input channel, from the calibration text). It is
what GPTQ's and llama.cpp's importance-weighted searches minimise, measured here for every candidate by
rounding the matrix as the artifact would (ggml for GGUF types, torch for integer grids) and decoding it.
The artifacts' own modules say what their candidates are (targets/gguf_budget.py, targets/hf_gptq_budget.py).

The choice minimises the summed error under the byte budget: a Lagrangian sweep (each matrix takes the
type minimising ``error + lambda * bytes``; the smallest lambda that fits), greedy upgrades in order of
error removed per byte while bytes remain, then trades (one matrix a step down, another a step up) while
one lowers the total. Every step is deterministic (ties go to fewer bytes, then to the name); on random
frontiers of 40 matrices the result is within 1 % of the exact optimum, of 5 matrices within 5 %
(tests/test_budget.py checks it against a dynamic program).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.recipe import Recipe

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from ``123456``, ``90MB`` (10^6) or ``1.5GiB`` (2^30)."""
    match = SIZE.match(str(text))
    if not match:
        raise QuantkitError(f"--max-size {text!r} is not a size; write bytes or a number with a unit, e.g. 90MB "
                            "or 1.5GiB")
    unit = (match.group(2) or "b").lower()
    return int(float(match.group(1)) * UNITS[unit])


@dataclass(frozen=True)
class Option:
    """One candidate type for one matrix: its stored bytes and predicted error."""

    type_name: str
    nbytes: int
    error: float
    weights: int = 0  # the matrix's weight count (for bits per weight)


@dataclass
class Allocation:
    types: dict[str, str]  # matrix name -> chosen type
    nbytes: int  # bytes of the allocated matrices
    predicted_error: float
    reachable: tuple[int, int]  # the fewest and the most bytes the candidates can give these matrices
    options: dict[str, list[Option]] = field(default_factory=dict)


@dataclass(frozen=True)
class BudgetFrame:
    """What a budget leaves to the matrices it types (``movable``), in an artifact's own accounting: ``--max-size``
    counts ``header + size_fixed`` beside them, ``--target-bpw`` counts ``bpw_fixed`` bytes beside them over
    ``bpw_elements`` weights."""

    movable: tuple  # the matrices whose type the budget chooses (the target's own records)
    low: int  # the movable matrices' bytes at their smallest candidates
    high: int  # ... at their largest
    size_fixed: int  # bytes of every other stored tensor
    header: int  # bytes of the artifact beside its tensor data (headers, padding)
    bpw_fixed: int  # bytes counted with the movable ones in bits per weight
    bpw_elements: int  # the weights bits per weight are over

    def budget_bytes(self, recipe: Recipe) -> int:
        """Bytes the budget allows the movable matrices."""
        if recipe.target_bpw is not None:
            return int(recipe.target_bpw * self.bpw_elements / 8) - self.bpw_fixed
        return parse_size(recipe.max_size) - self.header - self.size_fixed

    def total_bytes(self, movable_bytes: int) -> int:
        return self.header + self.size_fixed + movable_bytes

    def bits_per_weight(self, movable_bytes: int) -> float:
        return (self.bpw_fixed + movable_bytes) * 8 / self.bpw_elements

    def check(self, recipe: Recipe, name: str) -> None:
        """Refuses, naming the reachable range, a budget the candidates cannot meet."""
        left = self.budget_bytes(recipe)
        if self.low <= left <= self.high:
            return
        if recipe.target_bpw is not None:
            lo, hi = (self.bits_per_weight(b) for b in (self.low, self.high))
            raise QuantkitError(f"--target-bpw {recipe.target_bpw} is outside what {name} can reach for this model: "
                                f"{lo:.3f} to {hi:.3f} bits per weight; pick a budget in that range")
        lo, hi = (self.total_bytes(b) for b in (self.low, self.high))
        raise QuantkitError(f"--max-size {recipe.max_size} is outside what {name} can reach for this model: "
                            f"{lo} to {hi} bytes ({lo / 1e6:.2f} to {hi / 1e6:.2f} MB); pick a size in that range")

    def report(self, allocation: Allocation, recipe: Recipe, plot: str | None) -> tuple[str, dict]:
        """A note for the run's report and the manifest's ``budget`` entry."""
        reachable = (self.total_bytes(self.low), self.total_bytes(self.high))
        return report_entry(allocation, recipe.budget_label(), self.total_bytes(allocation.nbytes),
                            self.bits_per_weight(allocation.nbytes), reachable, plot)


def _frontier(options: list[Option]) -> list[Option]:
    """Candidates by increasing size, without any that a smaller one matches or beats in error."""
    kept: list[Option] = []
    for option in sorted(options, key=lambda o: (o.nbytes, o.error, o.type_name)):
        if not kept or option.error < kept[-1].error:
            kept.append(option)
    return kept


def _pick(frontier: list[Option], lam: float) -> int:
    costs = [o.error + lam * o.nbytes for o in frontier]
    return min(range(len(frontier)), key=lambda i: (costs[i], frontier[i].nbytes))


def allocate(options: dict[str, list[Option]], budget: int) -> Allocation:
    """The types minimising the summed predicted error with at most ``budget`` bytes for these matrices."""
    names = sorted(options)
    fronts = {n: _frontier(options[n]) for n in names}
    low = sum(f[0].nbytes for f in fronts.values())
    high = sum(f[-1].nbytes for f in fronts.values())
    if budget < low:
        raise QuantkitError(f"the budget leaves {budget} bytes for the quantized matrices, below the {low} bytes of "
                            "their smallest candidate types")
    choice = {n: len(fronts[n]) - 1 for n in names}
    if high > budget:
        choice = _lagrangian(fronts, budget)
        _upgrade(fronts, choice, budget)
        _exchange(fronts, choice, budget)
    chosen = {n: fronts[n][choice[n]] for n in names}
    return Allocation({n: o.type_name for n, o in chosen.items()}, sum(o.nbytes for o in chosen.values()),
                      sum(o.error for o in chosen.values()), (low, high), options)


def _total(fronts: dict[str, list[Option]], choice: dict[str, int]) -> int:
    return sum(fronts[n][i].nbytes for n, i in choice.items())


def _lagrangian(fronts: dict[str, list[Option]], budget: int) -> dict[str, int]:
    """The choice at the smallest lambda whose total fits (bisection on lambda; 200 halvings is exact in
    float terms)."""
    lo, hi = 0.0, 1.0
    while _total(fronts, {n: _pick(f, hi) for n, f in fronts.items()}) > budget:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _total(fronts, {n: _pick(f, mid) for n, f in fronts.items()}) > budget:
            lo = mid
        else:
            hi = mid
    return {n: _pick(f, hi) for n, f in fronts.items()}


def _exchange(fronts: dict[str, list[Option]], choice: dict[str, int], budget: int, rounds: int = 1000) -> None:
    """Trade bytes between matrices while it lowers the total error: one matrix one step down, another one
    step up (the Lagrangian choice can leave such a trade when a few large matrices dominate), then spend
    what is left; the best trade first, ties by name."""
    names = sorted(fronts)
    for _ in range(rounds):
        spare = budget - _total(fronts, choice)
        best = None
        for down in names:
            i = choice[down]
            if i == 0:
                continue
            freed = fronts[down][i].nbytes - fronts[down][i - 1].nbytes
            loss = fronts[down][i - 1].error - fronts[down][i].error
            for up in names:
                j = choice[up]
                if up == down or j + 1 >= len(fronts[up]):
                    continue
                extra = fronts[up][j + 1].nbytes - fronts[up][j].nbytes
                gain = fronts[up][j].error - fronts[up][j + 1].error - loss
                if extra <= spare + freed and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, down, up)
        if best is None:
            return
        choice[best[1]] -= 1
        choice[best[2]] += 1
        _upgrade(fronts, choice, budget)


def _upgrade(fronts: dict[str, list[Option]], choice: dict[str, int], budget: int) -> None:
    """Spend what the Lagrangian choice leaves: the next larger type of the matrix that removes the most
    error per extra byte, while one fits."""
    spare = budget - _total(fronts, choice)
    while True:
        best = None
        for name in sorted(fronts):
            i = choice[name]
            if i + 1 >= len(fronts[name]):
                continue
            here, up = fronts[name][i], fronts[name][i + 1]
            extra = up.nbytes - here.nbytes
            if extra > spare:
                continue
            gain = (here.error - up.error) / extra
            if best is None or gain > best[0]:
                best = (gain, name, extra)
        if best is None:
            return
        choice[best[1]] += 1
        spare -= best[2]


ALIGNMENT = 32  # GGUF pads each tensor's data to this many bytes


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class Candidate(Protocol):
    """One storage type a budget may give a matrix: its name, its stored bytes for a matrix shape, and the
    matrix rounded to it and decoded (row chunk by row chunk, as the artifact will round it)."""

    name: str

    def nbytes(self, shape: tuple[int, int]) -> int: ...

    def round_trip(self, chunk: torch.Tensor, importance: torch.Tensor) -> np.ndarray: ...


def matrix_options(rows: Iterable[torch.Tensor], importance: torch.Tensor, shape: tuple[int, int],
                   candidates: Sequence[Candidate]) -> list[Option]:
    """Each candidate's bytes and activation-weighted rounding error for one matrix; ``rows`` yields its float32
    row chunks, ``importance`` is ``E[x_j^2]`` per input column."""
    errors = dict.fromkeys((c.name for c in candidates), 0.0)
    weight = importance.double().numpy()
    for chunk in rows:
        values = chunk.float().numpy()
        for c in candidates:
            decoded = c.round_trip(chunk, importance)
            errors[c.name] += float(((decoded - values).astype(np.float64) ** 2).sum(axis=0) @ weight)
    weights = shape[0] * shape[1]
    return [Option(c.name, c.nbytes(shape), errors[c.name], weights) for c in candidates]


def bits_per_weight(option: Option) -> float:
    return option.nbytes * 8 / option.weights


def report_entry(allocation: Allocation, label: str, total_bytes: int, bpw: float, reachable: tuple[int, int],
                 plot: str | None) -> tuple[str, dict]:
    """A note for the run's report and the manifest's ``budget`` entry."""
    counts = Counter(allocation.types.values())
    order = _type_order(allocation)
    spread = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: order[kv[0]]))
    note = (f"budget {label}: {len(allocation.types)} block matrices typed by predicted loss ({spread}); "
            f"{total_bytes} bytes, {bpw:.3f} bits per weight")
    entry = {"budget": label, "bytes": total_bytes, "bits_per_weight": round(bpw, 4),
             "reachable_bytes": list(reachable),
             "predicted_error": allocation.predicted_error,
             "predicted_error_means": "sum over matrices of sum_j E[x_j^2] (W - Q(W))_ij^2 (activation-weighted "
                                      "squared rounding error), in the model's units",
             "types": allocation.types, "counts": dict(sorted(counts.items())),
             "errors": {n: {o.type_name: o.error for o in opts} for n, opts in allocation.options.items()},
             "plot": plot}
    return note, entry


def _type_order(allocation: Allocation) -> dict[str, float]:
    """Candidate types by their mean bits per weight over the matrices (for legends and summaries)."""
    seen: dict[str, list[float]] = {}
    for opts in allocation.options.values():
        for o in opts:
            seen.setdefault(o.type_name, []).append(bits_per_weight(o))
    return {name: sum(v) / len(v) for name, v in seen.items()}


def plot_sensitivity(allocation: Allocation, n_layers: int, layer_of: Callable[[str], int], path: Path) -> str | None:
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
        layer = layer_of(name)
        for o in opts:
            per_type.setdefault(o.type_name, np.zeros(n_layers))[layer] += o.error
        chosen = next(o for o in opts if o.type_name == allocation.types[name])
        bits[layer] += chosen.nbytes * 8
        weights[layer] += chosen.weights
    order = _type_order(allocation)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    layers = np.arange(n_layers)
    for type_name, errors in sorted(per_type.items(), key=lambda kv: order[kv[0]]):
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
