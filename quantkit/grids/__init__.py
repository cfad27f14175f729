"""Grid registry: integer grids are built from a recipe, GGUF block types are looked up by name."""

from quantkit.grids.base import PER_CHANNEL, PER_TENSOR, Grid, QuantizedWeight, QuantParams
from quantkit.grids.gguf_legacy import GGUFBlockGrid
from quantkit.grids.gguf_types import GGUF_TYPES, GGUFType, gguf_type
from quantkit.grids.integer import IntGrid

# the block grids of the GGUF type registry, by name
GGUF_GRIDS: dict[str, GGUFBlockGrid] = {t.name: t.grid for t in GGUF_TYPES.values() if t.grid is not None}

__all__ = [
    "GGUF_GRIDS",
    "GGUF_TYPES",
    "PER_CHANNEL",
    "PER_TENSOR",
    "GGUFBlockGrid",
    "GGUFType",
    "Grid",
    "IntGrid",
    "QuantParams",
    "QuantizedWeight",
    "gguf_type",
]
