"""llama.cpp's k-quant mixes as data: a base type plus per-tensor rules.

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
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

LayerRule = Callable[[int, int], str | None]  # (layer index, layer count) -> type, or None for the base type


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _none(i: int, n: int) -> None:
    return None


@dataclass(frozen=True)
class Mix:
    name: str
    base: str
    file_type: int  # llama.cpp's LLAMA_FTYPE for this mix
    attn_v: LayerRule = _none
    ffn_down: LayerRule = _none
    fallbacks: list[str] = field(default_factory=list, compare=False)

    def type_for(self, gguf_name: str, layer: int | None, n_layers: int, row_length: int, tied: bool) -> str:
        """The GGUF type of one matrix (before any shape fallback)."""
        if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
            return "Q8_0" if row_length % SUPER_BLOCK else "Q6_K"
        rule = {"attn_v": self.attn_v, "ffn_down": self.ffn_down}.get(_role(gguf_name))
        chosen = rule(layer, n_layers) if rule and layer is not None else None
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
    return lambda i, n: target if use_more_bits(i, n) else None


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("Q4_K_S", "Q4_K", 14, attn_v=lambda i, n: "Q5_K" if i < 4 else None,
        ffn_down=lambda i, n: "Q5_K" if i < n // 8 else None),
    Mix("Q4_K_M", "Q4_K", 15, attn_v=_more_bits_to("Q6_K"), ffn_down=_more_bits_to("Q6_K")),
    Mix("Q5_K_S", "Q5_K", 16),
    Mix("Q5_K_M", "Q5_K", 17, attn_v=_more_bits_to("Q6_K"), ffn_down=_more_bits_to("Q6_K")),
)}
