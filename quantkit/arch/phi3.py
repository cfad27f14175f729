"""Phi-3 / Phi-4-mini: Llama's block with q/k/v fused into ``qkv_proj`` and gate/up fused into
``gate_up_proj`` (GGUF ``attn_qkv`` and ``ffn_up``, the latter gate rows first, as llama.cpp reads it);
llama.cpp rotates NEOX-style, so rows keep HF's order. The fused linears fold AWQ scales from the norms
only (o_proj and down_proj read a part of a fused output)."""

from quantkit.arch.base import Architecture, FoldPoint

PHI3 = Architecture(
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
