"""Grid registry: integer grids are built from a recipe, GGUF block types are looked up by name."""

from quantkit.grids.base import PER_CHANNEL, PER_TENSOR, Grid, QuantizedWeight, QuantParams
from quantkit.grids.gguf_kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from quantkit.grids.gguf_legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, GGUFBlockGrid
from quantkit.grids.integer import IntGrid

GGUF_GRIDS: dict[str, GGUFBlockGrid] = {
    g.name: g for g in (Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1(), Q6_K(), Q5_K(), Q4_K(), Q3_K(), Q2_K())
}

__all__ = [
    "GGUF_GRIDS",
    "PER_CHANNEL",
    "PER_TENSOR",
    "GGUFBlockGrid",
    "Grid",
    "IntGrid",
    "QuantParams",
    "QuantizedWeight",
]
