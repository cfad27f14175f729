"""Mixtral: Llama's attention with a mixture-of-experts MLP (``block_sparse_moe``: a router ``gate`` picking
``num_experts_per_tok`` of ``num_local_experts`` experts, each a SwiGLU MLP ``w1`` gate, ``w3`` up, ``w2``
down). llama.cpp reads it as its ``llama`` architecture with expert counts and the experts stacked into
``ffn_{gate,up,down}_exps``; the router (``ffn_gate_inp``) stays in float. transformers 5 loads
``block_sparse_moe`` as the block's ``mlp``."""

from quantkit.arch.base import LLAMA_GGUF_NAMES, LLAMA_LINEARS, Architecture, Experts, FoldPoint

MIXTRAL = Architecture(
    name="mixtral",
    hf_class="MixtralForCausalLM",
    gguf_arch="llama",
    linears=LLAMA_LINEARS[:4],
    linear_groups=(LLAMA_LINEARS[:3], (LLAMA_LINEARS[3],)),
    gguf_block_names={k: v for k, v in LLAMA_GGUF_NAMES.items() if not k.startswith("mlp.")},
    fold_points=(
        FoldPoint("input_layernorm", LLAMA_LINEARS[:3], "self_attn"),
        FoldPoint("self_attn.v_proj", (LLAMA_LINEARS[3],), "self_attn.o_proj"),
        FoldPoint("post_attention_layernorm", ("block_sparse_moe.gate",), "block_sparse_moe"),
    ),
    experts=Experts(module="block_sparse_moe", count_keys=("num_local_experts",), gate="w1", up="w3", down="w2",
                    loaded_as="mlp"),
)

FAMILIES = (MIXTRAL,)
