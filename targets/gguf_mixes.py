"""llama.cpp's k-quant mixes as data: a base type plus per-tensor rules.

Offered: Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M. Not offered: llama.cpp's Q2_K mix (its name is taken by the
single type ``gguf:Q2_K`` here) and Q2_K_S (llama.cpp only builds it with an importance matrix).

A mix decides the type of every matrix the way llama.cpp's quantizer does for the same file type:
the output projection (and a tied token embedding) in Q6_K, more bits for attention-v and ffn-down in
some layers, everything else in the base type. Tensors whose rows do not fit the chosen type's
256-weight super-blocks fall back to a 32-block type, and the report lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

SUPER_BLOCK = 256
# llama.cpp's fallback for rows that are not a multiple of 256
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# (layer index, layer count, query heads per KV head) -> type, or None for the base type
LayerRule = Callable[[int, int, int], str | None]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Mix:
    name: str
    base: str
    file_type: int  # llama.cpp's LLAMA_FTYPE for this mix
    rules: dict[str, LayerRule] = field(default_factory=dict)  # tensor role (attn_v, ffn_down, ...) -> rule

    def type_for(self, gguf_name: str, layer: int | None, n_layers: int, row_length: int, tied: bool,
                 gqa: int = 1) -> str:
        """The GGUF type of one matrix (before any shape fallback)."""
        if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
            return "Q8_0" if row_length % SUPER_BLOCK else "Q6_K"
        rule = self.rules.get(_role(gguf_name))
        chosen = rule(layer, n_layers, gqa) if rule and layer is not None else None
        return chosen or self.base


def _role(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


def fallback_type(gguf_type: str, row_length: int) -> str | None:
    """The type llama.cpp falls back to when ``row_length`` does not fit ``gguf_type``; None if it fits."""
    if gguf_type not in FALLBACK or row_length % SUPER_BLOCK == 0:
        return None
    return FALLBACK[gguf_type] if row_length % 32 == 0 else "F16"


def _more_bits_to(target: str) -> LayerRule:
    return lambda i, n, gqa: target if use_more_bits(i, n) else None


def _always(target: str) -> LayerRule:
    return lambda i, n, gqa: target


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("Q3_K_S", "Q3_K", 11),
    Mix("Q3_K_M", "Q3_K", 12, {"attn_v": lambda i, n, gqa: "Q5_K" if i < 2 else "Q4_K",
                               "ffn_down": lambda i, n, gqa: "Q5_K" if i < n // 16 else "Q4_K",
                               "attn_output": _always("Q4_K")}),
    Mix("Q3_K_L", "Q3_K", 13, {"attn_v": _always("Q5_K"), "ffn_down": _always("Q5_K"),
                               "attn_output": _always("Q5_K")}),
    Mix("Q4_K_S", "Q4_K", 14, {"attn_v": lambda i, n, gqa: "Q5_K" if i < 4 else None,
                               "ffn_down": lambda i, n, gqa: "Q5_K" if i < n // 8 else None}),
    Mix("Q4_K_M", "Q4_K", 15, {"attn_v": _more_bits_to("Q6_K"), "ffn_down": _more_bits_to("Q6_K")}),
    Mix("Q5_K_S", "Q5_K", 16),
    Mix("Q5_K_M", "Q5_K", 17, {"attn_v": _more_bits_to("Q6_K"), "ffn_down": _more_bits_to("Q6_K")}),
)}
