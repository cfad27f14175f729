"""Phi-3 / Phi-4-mini: Llama's block with q/k/v fused into ``qkv_proj`` and gate/up fused into
``gate_up_proj`` (GGUF ``attn_qkv`` and ``ffn_up``, the latter gate rows first, as llama.cpp reads it);
llama.cpp rotates NEOX-style, so rows keep HF's order. The fused linears fold AWQ scales from the norms
only (o_proj and down_proj read a part of a fused output).

GGUF hyperparameters as llama.cpp's converter writes this family's: the rotary width from
``partial_rotary_factor`` (Phi-4-mini rotates 3/4 of each head), the original context of longrope
(Phi-3.5, Phi-4-mini) with the attention factor llama.cpp applies past it, and a sliding window of 0 when the
config has none (what llama.cpp reads as "Phi-4, no window")."""

from __future__ import annotations

from dataclasses import dataclass

from quantkit.arch.base import Architecture, FoldPoint, hparam
from quantkit.arch.rope import longrope_attention_factor, rope_of


@dataclass(frozen=True)
class Phi3(Architecture):
    def write_gguf_hparams(self, w, config: dict, n_layers: int) -> None:
        self.write_gguf_shape(w, config, n_layers)
        rope = rope_of(config)
        original = rope.params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        if original is not None:
            w.add_rope_scaling_orig_ctx_len(int(original))
        # the converter's int(partial * hidden) // heads: head_dim * partial, as Phi-3 has no head_dim of its own
        w.add_rope_dimension_count(rope.rotary_dims(self.head_dim(config)))
        w.add_rope_freq_base(rope.theta)
        w.add_sliding_window(int(config.get("sliding_window") or 0))
        if self.gguf_extra_tensors(config):  # longrope's factors: llama.cpp also needs its attention factor
            context = int(hparam(config, "max_position_embeddings"))
            w.add_rope_scaling_attn_factors(longrope_attention_factor(context, int(original or context)))
        w.add_vocab_size(hparam(config, "vocab_size"))


PHI3 = Phi3(
    name="phi3",
    hf_class="Phi3ForCausalLM",
    gguf_arch="phi3",
    linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    linear_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    gguf_block_names={
        "input_layernorm": "attn_norm",
        "self_attn.qkv_proj": "attn_qkv",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    },
    rope_permute=False,
    fused=True,
    fold_points=(
        FoldPoint("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        FoldPoint("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    ),
)

FAMILIES = (PHI3,)
