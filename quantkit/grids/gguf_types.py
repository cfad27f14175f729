"""Every GGUF tensor type quantkit writes, in one table: its block (weights per block and bytes per block,
from gguf-py's ``GGML_QUANT_SIZES``), the grid that quantizes it (none for float types), and the type
llama.cpp falls back to for rows that are not a multiple of its block.

File types (Q4_K_M, ...) and their per-tensor rules build on this table (``targets/gguf_mixes.py``).
Adding a type is its grid class plus one ``GGUFType`` line here.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from quantkit.errors import QuantkitError
from quantkit.grids.gguf_iquants import IQ4_NL, IQ4_XS
from quantkit.grids.gguf_kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from quantkit.grids.gguf_legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, GGUFBlockGrid


@dataclass(frozen=True)
class GGUFType:
    name: str
    grid: GGUFBlockGrid | None = None  # None: a float type, written as is
    fallback: str | None = None  # llama.cpp's type for rows its blocks do not fit (k-quants only)

    @property
    def ggml_type(self) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType[self.name]

    @property
    def block(self) -> int:
        """Weights per block (1 for float types)."""
        return gguf.GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def block_bytes(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.ggml_type][1]

    @property
    def is_float(self) -> bool:
        return self.grid is None

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block

    def row_bytes(self, n_per_row: int) -> int:
        if n_per_row % self.block:  # ggml would write past the buffer: never hand it such rows
            raise ValueError(f"{self.name} needs rows that are a multiple of {self.block}; got rows of {n_per_row}")
        return n_per_row // self.block * self.block_bytes


# in llama-quantize's order of size; fallbacks as llama.cpp's quantizer applies them to 256-weight super-blocks
GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("F32"), GGUFType("F16"), GGUFType("BF16"),
    GGUFType("Q8_0", Q8_0()),
    GGUFType("Q6_K", Q6_K(), fallback="Q8_0"),
    GGUFType("Q5_K", Q5_K(), fallback="Q5_1"),
    GGUFType("Q5_1", Q5_1()),
    GGUFType("Q5_0", Q5_0()),
    GGUFType("Q4_K", Q4_K(), fallback="Q5_0"),
    GGUFType("Q4_1", Q4_1()),
    GGUFType("Q4_0", Q4_0()),
    GGUFType("IQ4_NL", IQ4_NL()),
    GGUFType("IQ4_XS", IQ4_XS(), fallback="IQ4_NL"),
    GGUFType("Q3_K", Q3_K(), fallback="Q4_0"),
    GGUFType("Q2_K", Q2_K(), fallback="Q4_0"),
)}


def gguf_type(name: str) -> GGUFType:
    try:
        return GGUF_TYPES[name]
    except KeyError:
        raise QuantkitError(f"unknown GGUF tensor type {name!r}; quantkit writes {', '.join(GGUF_TYPES)}") from None
