"""Rotary position embeddings as checkpoints describe them, and as llama.cpp wants them in a GGUF file.

config.json spells rope in three generations: ``rope_scaling`` (transformers 4), ``rope_parameters``
(transformers 5, ``rope_theta`` inside), and per layer type (Gemma 3: ``{"full_attention": {...},
"sliding_attention": {...}}``). ``rope_of`` reads any of them into one ``Rope``; the GGUF target writes it
the way llama.cpp's converter (convert_hf_to_gguf.py) does: metadata keys for linear and yarn scaling, a
``rope_freqs`` tensor of per-frequency divisors for Llama 3's scaling, ``rope_factors_long`` /
``rope_factors_short`` tensors for Phi-3's longrope (whose attention factor the family writes). A variant that
llama.cpp's graphs cannot express is refused in one line naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from quantkit.errors import QuantkitError

# HF rope_type -> what llama.cpp does with it ("su" is longrope's older name)
EXPRESSIBLE = ("default", "linear", "yarn", "llama3", "longrope", "su")
DEFAULT_BASE = 10000.0


@dataclass(frozen=True)
class Rope:
    kind: str
    theta: float
    params: dict = field(default_factory=dict)  # the global (full-attention) layers' parameters
    sliding_theta: float | None = None  # rope base of sliding-window layers, when the config gives one
    partial: float = 1.0  # share of each head's dimensions that rotate

    def rotary_dims(self, head_dim: int) -> int:
        return int(head_dim * self.partial)


def rope_of(config: dict, target: str = "GGUF") -> Rope:
    """The checkpoint's rope, or a QuantkitError naming a variant ``target`` cannot express."""
    raw = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    per_type = "full_attention" in raw or "sliding_attention" in raw
    params = dict(raw.get("full_attention") or {}) if per_type else raw
    sliding = raw.get("sliding_attention") if per_type else None
    kind = str(params.get("rope_type", params.get("type", "default")) or "default").lower()
    if kind not in EXPRESSIBLE:
        raise QuantkitError(f"rope type {kind!r} cannot be expressed by the {target} target (llama.cpp's graphs "
                            f"have {', '.join(k for k in EXPRESSIBLE if k != 'su')}); use a checkpoint without it")
    if sliding and str(sliding.get("rope_type", "default")) not in ("default", "None"):
        raise QuantkitError(f"rope type {sliding['rope_type']!r} on sliding-window layers cannot be expressed by "
                            f"the {target} target (llama.cpp scales the global layers' rope only)")
    theta = params.get("rope_theta", config.get("rope_theta", DEFAULT_BASE))
    local = (sliding or {}).get("rope_theta", config.get("rope_local_base_freq"))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return Rope(kind=kind, theta=float(theta), params=params, sliding_theta=None if local is None else float(local),
                partial=float(partial))


def write_gguf_scaling(w, rope: Rope) -> None:
    """llama.cpp's rope-scaling keys for linear and yarn (what its converter's base model class writes); Llama 3
    and longrope go into tensors instead (``gguf_rope_tensors``)."""
    p = rope.params
    if rope.kind == "linear" and "factor" in p:
        w.add_rope_scaling_type(_scaling_type("LINEAR"))
        w.add_rope_scaling_factor(float(p["factor"]))
    elif rope.kind == "yarn" and "factor" in p:
        w.add_rope_scaling_type(_scaling_type("YARN"))
        w.add_rope_scaling_factor(float(p["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(p["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            value = p.get(key, p.get("attn_factor")) if key == "attention_factor" else p.get(key)
            if value is not None:
                add(float(value))
    elif rope.kind in ("longrope", "su"):
        w.add_rope_scaling_type(_scaling_type("LONGROPE"))


def _scaling_type(name: str):
    import gguf

    return gguf.RopeScalingType[name]


def llama3_divisors(rope: Rope, head_dim: int) -> list[float]:
    """Llama 3's per-frequency divisors (``rope_freqs.weight``): 1 for short wavelengths, ``factor`` for long ones,
    a smooth blend between, as transformers scales the inverse frequencies; computed in float32 as llama.cpp's
    converter does, so the tensor's bytes are the same."""
    import torch

    p = rope.params
    factor = float(p.get("factor", 8.0))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_context = float(p.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blend = 1 / ((1 - smooth) / factor + smooth)
    divisors = torch.where(wavelen < old_context / high, torch.ones_like(blend),
                           torch.where(wavelen > old_context / low, torch.full_like(blend, factor), blend))
    return divisors.tolist()


def longrope_factors(rope: Rope, rotary_dims: int) -> tuple[list[float], list[float]]:
    """Phi-3's long and short per-frequency factors, checked against the rotary width."""
    long, short = rope.params.get("long_factor"), rope.params.get("short_factor")
    if not long or not short or len(long) != len(short) or len(long) * 2 != rotary_dims:
        raise QuantkitError(f"longrope needs long_factor and short_factor of {rotary_dims // 2} values each in "
                            "config.json's rope parameters; fix the config")
    return [float(x) for x in long], [float(x) for x in short]


def longrope_attention_factor(context: int, original_context: int) -> float:
    """The attention scale llama.cpp applies for longrope past the original context (its converter's formula)."""
    scale = context / original_context
    return math.sqrt(1 + math.log(scale) / math.log(original_context)) if scale > 1.0 else 1.0


def gguf_rope_tensors(rope: Rope, head_dim: int) -> list[tuple[str, list[float]]]:
    """The F32 tensors llama.cpp reads rope scaling from, named as its converter names them."""
    if rope.kind == "llama3":
        return [("rope_freqs.weight", llama3_divisors(rope, head_dim))]
    if rope.kind in ("longrope", "su") and rope.params.get("long_factor"):
        long, short = longrope_factors(rope, rope.rotary_dims(head_dim))
        return [("rope_factors_long.weight", long), ("rope_factors_short.weight", short)]
    return []
