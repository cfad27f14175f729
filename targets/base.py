"""What every artifact target provides: a grid, an exporter, and logits from its own runtime."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.grids import PER_CHANNEL, Grid, QuantizedWeight
from quantkit.methods.rtn import RoundToNearest
from quantkit.model import ModelSource
from quantkit.recipe import Recipe
from quantkit.sequential import GridPlan


@dataclass(frozen=True)
class Rounding:
    """A tensor the recipe rounds to nearest on its grid (with ``importance`` per input column, when an
    importance matrix weighs it): a target may round it itself, row chunk by row chunk."""

    importance: torch.Tensor | None = None


class Quantizer:
    """Where targets get their weights: the recipe's method applied to one tensor on one grid.

    This base rounds every tensor to nearest; the pipeline's quantizer applies the run's method
    (GPTQ, AWQ, an importance matrix) and shares results between targets.
    """

    def __init__(self, source: ModelSource):
        self.source = source

    def quantize(self, name: str, grid: Grid, plan: GridPlan | None = None) -> QuantizedWeight:
        """``name`` quantized on ``grid``; ``plan``: the artifact's grid for every block linear, so a
        per-linear method quantizes a file that mixes grids in one pass."""
        return RoundToNearest().quantize_weight(self.source.load(name), grid)

    def rounding(self, name: str, grid: Grid) -> Rounding | None:
        """How ``name`` is rounded when that is all the method does to it; None when the method's own
        result (``quantize``) is needed."""
        return Rounding()

    def replaced(self, name: str, grid: Grid | None, plan: GridPlan | None = None) -> torch.Tensor | None:
        """A float tensor the method rescaled for ``grid`` (AWQ folds scales into norms), or None."""
        return None

    def importance(self, name: str) -> torch.Tensor | None:
        """``E[x_j^2]`` of ``name``'s input channels (an importance matrix's entry), for predicting what rounding
        it costs; None when the run has no calibration data."""
        return None

    def load(self, name: str, grid: Grid | None, plan: GridPlan | None = None) -> torch.Tensor:
        """A float tensor of the artifact for ``grid``: the method's rescaled one, or the source's."""
        replaced = self.replaced(name, grid, plan)
        return replaced if replaced is not None else self.source.load(name)


@dataclass(frozen=True)
class ExportContext:
    """What every target exports from; immutable: a run that learns its weights makes a new one (``replace``)."""

    source: ModelSource
    recipe: Recipe
    quantized_names: list[str]
    quantizer: Quantizer | None = None  # None: round to nearest
    progress: bool = True

    def __post_init__(self) -> None:
        if self.quantizer is None:
            object.__setattr__(self, "quantizer", Quantizer(self.source))

    def quantize(self, name: str, grid: Grid, plan: GridPlan | None = None) -> QuantizedWeight:
        return self.quantizer.quantize(name, grid, plan)

    def importance(self, name: str) -> torch.Tensor | None:
        """``E[x_j^2]`` of ``name``'s input channels (an importance matrix's entry), for predicting what rounding
        it costs; None when the run has no calibration data."""
        return None

    def load(self, name: str, grid: Grid | None, plan: GridPlan | None = None) -> torch.Tensor:
        return self.quantizer.load(name, grid, plan)


@dataclass(frozen=True)
class ExportReport:
    """What a target's export says about the artifact it wrote: report lines (choices made while exporting, e.g.
    type fallbacks) and, where the stored size differs from the grid's nominal one, the bits per weight."""

    notes: tuple[str, ...] = ()
    bits_per_weight: float | None = None
    budget: dict | None = None  # a budgeted file's allocation, predicted loss and plot (quantkit.budget)


class Target(ABC):
    kind: str
    takes_budget = False  # whether --target-bpw / --max-size can choose this target's per-tensor types

    def __init__(self, option: str | None):
        self.option = option

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.option}" if self.option else self.kind

    @abstractmethod
    def grid(self, recipe: Recipe) -> Grid | None:
        """The grid this artifact stores quantized weights on (None: nothing quantized)."""

    @abstractmethod
    def bits_per_weight(self, recipe: Recipe) -> float:
        """Nominal bits per quantized weight, used to pick the default accuracy gate."""

    @abstractmethod
    def filename(self) -> str:
        """File or folder name of the artifact inside the output folder."""

    def configure(self, recipe: Recipe) -> None:  # noqa: B027 - optional hook
        """Take run-wide choices that affect checking (e.g. which runtime loads the artifact)."""

    def validate(self, ctx: ExportContext) -> None:  # noqa: B027 - optional hook, most targets add checks
        """Reject impossible combinations before any work starts."""

    @abstractmethod
    def export(self, ctx: ExportContext, path: Path) -> ExportReport:
        """Write the artifact to ``path``; what it says about it comes back in the report (a target keeps no
        state between calls)."""

    @abstractmethod
    def logits(self, path: Path, ids: torch.Tensor, progress: bool = True) -> Iterator[np.ndarray]:
        """Logits of each row of ``ids``, computed by the artifact's own runtime."""

    @abstractmethod
    def runtime(self) -> dict:
        """Name and version of the runtime that checks this artifact."""

    def remedies(self, recipe: Recipe) -> list[str]:
        """What to try when this artifact fails its accuracy gate."""
        tips = []
        if recipe.method == "rtn":
            tips.append("--method gptq (or awq): they learn from --calib text and usually close most of the gap")
        tips.append(f"more bits (--bits {min(recipe.bits + 1, 8)}) or smaller groups (--group-size 64 or 32)")
        return tips

    def verify_tokenizer(self, path: Path, tokenizer, texts: list[str]) -> dict | None:
        """Compare the runtime's tokenization with the Hugging Face tokenizer's, if it has one."""
        return None

    def load_check_row(self, path: Path, seq_len: int) -> torch.Tensor:
        """The row ``load_failure`` runs: token 0, ``seq_len`` times."""
        return torch.zeros((1, seq_len), dtype=torch.long)

    def load_failure(self, path: Path, seq_len: int) -> str | None:
        """Why the artifact does not run in its runtime, or None when it loads and computes the logits of one row
        of ``seq_len`` tokens (a fixed-length program takes no other). ``--no-verify``'s only check: no
        reference and no score, but never a file its own runtime cannot open."""
        rows = self.logits(path, self.load_check_row(path, seq_len), progress=False)
        try:  # the row is read while ``rows`` is alive: some runtimes' rows are views into a session it closes
            np.asarray(next(iter(rows)))
        except QuantkitError:
            raise  # the environment's (a runtime not installed), not the artifact's
        except Exception as exc:  # whatever the runtime raises for a file it cannot load or run
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}"
        return None


class DynamicActivationTarget(Target):
    """A mobile target whose option fixes the weight layout, with int8 activations quantized at run time:
    ``8da4w`` (int4 weights in groups of ``--group-size``), ``8da8w`` (int8 per channel) or ``fp32``."""

    WEIGHT_BITS = {"8da4w": 4, "8da8w": 8, "fp32": None}
    DEFAULT_OPTION = "8da4w"

    def __init__(self, option: str | None):
        option = option or self.DEFAULT_OPTION
        if option not in self.WEIGHT_BITS:
            raise QuantkitError(f"{self.kind} option {option!r} is unknown; use one of: {', '.join(self.WEIGHT_BITS)}")
        super().__init__(option)

    def weight_layout(self, recipe: Recipe) -> tuple[int, int] | None:
        """(bits, group size) of the stored weights; None for fp32."""
        bits = self.WEIGHT_BITS[self.option]
        if bits is None:
            return None
        return bits, recipe.group_size if bits == 4 else PER_CHANNEL
