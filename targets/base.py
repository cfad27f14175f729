"""What every artifact target provides: a grid, an exporter, and logits from its own runtime."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantkit.grids import Grid, QuantizedWeight
from quantkit.model import ModelSource
from quantkit.recipe import Recipe
from quantkit.sequential import GridPlan


@dataclass
class ExportContext:
    source: ModelSource
    recipe: Recipe
    quantized_names: list[str]
    # Returns the recipe's method applied to one tensor on one grid (cached across targets).
    quantize: Callable[[str, Grid], QuantizedWeight]
    progress: bool = True

    def load(self, name: str, grid: Grid | None) -> torch.Tensor:
        """A float tensor of the artifact for ``grid``: the source's, or the method's rescaled one."""
        loader = getattr(self.quantize, "load", None)
        return loader(name, grid) if loader else self.source.load(name)

    def quantize_planned(self, name: str, grid: Grid, plan: GridPlan | None) -> QuantizedWeight:
        """``quantize(name, grid)``, telling quantizers that take one (the pipeline's) the artifact's
        grid for every block linear, so a per-linear method quantizes a mixed file in one pass."""
        planned = getattr(self.quantize, "planned", None)
        return planned(name, grid, plan) if planned and plan else self.quantize(name, grid)


class Target(ABC):
    kind: str

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
    def export(self, ctx: ExportContext, path: Path) -> None:
        """Write the artifact to ``path``."""

    @abstractmethod
    def logits(self, path: Path, ids: torch.Tensor, progress: bool = True) -> Iterator[np.ndarray]:
        """Logits of each row of ``ids``, computed by the artifact's own runtime."""

    @abstractmethod
    def runtime(self) -> dict:
        """Name and version of the runtime that checks this artifact."""

    def notes(self) -> list[str]:
        """Lines for the report about choices made while exporting (e.g. type fallbacks)."""
        return []

    def verify_tokenizer(self, path: Path, tokenizer, texts: list[str]) -> dict | None:
        """Compare the runtime's tokenization with the Hugging Face tokenizer's, if it has one."""
        return None
