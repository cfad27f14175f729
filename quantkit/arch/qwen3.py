"""Qwen3: Llama's block without biases, with a per-head RMSNorm on the queries and keys before rope
(``self_attn.q_norm`` / ``k_norm``, GGUF ``attn_q_norm`` / ``attn_k_norm``); head_dim may differ from
hidden / heads. llama.cpp rotates NEOX-style, so q/k rows keep HF's order."""

from quantkit.arch.base import LLAMA_GGUF_NAMES, Architecture

QWEN3 = Architecture(
    name="qwen3",
    hf_class="Qwen3ForCausalLM",
    gguf_arch="qwen3",
    rope_permute=False,
    qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
    gguf_block_names={**LLAMA_GGUF_NAMES, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
)

FAMILIES = (QWEN3,)
