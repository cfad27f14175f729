"""Qwen2 (and Qwen2.5): Llama's block with biases on q/k/v; llama.cpp rotates NEOX-style (no row permute)."""

from quantkit.arch.base import Architecture

QWEN2 = Architecture(
    name="qwen2",
    hf_class="Qwen2ForCausalLM",
    gguf_arch="qwen2",
    rope_permute=False,
    biased_linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    size_70b_needs_gqa=False,
)

FAMILIES = (QWEN2,)
