"""Architectures as data: tensor names, execution order, fold points, GGUF layout.

Adding an architecture is one ``Architecture(...)`` entry and one line in ``ARCHITECTURES``;
nothing in the pipeline branches on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Linears of a Llama-style decoder block, in the order the block executes them.
LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

# HF block-relative tensor name -> GGUF block-relative tensor name (without ".weight"/".bias").
LLAMA_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass(frozen=True)
class FoldPoint:
    """A scale applied to the inputs of ``consumers`` can be folded into ``producer``'s output; AWQ scores a
    candidate scale on the output of ``inspect``, the smallest module that holds all the consumers."""

    producer: str
    consumers: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class Architecture:
    name: str
    hf_class: str
    gguf_arch: str
    linears: tuple[str, ...] = LLAMA_LINEARS
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    block_prefix: str = "model.layers.{index}."
    blocks_module: str = "model.layers"
    rotary_module: str = "model.rotary_emb"
    # Linears that read the same input, in execution order (sequential methods quantize group by group).
    linear_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    embedding: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    gguf_block_names: dict[str, str] = field(default_factory=lambda: dict(LLAMA_GGUF_NAMES))
    # llama.cpp's "llama" graph applies rope to interleaved pairs: q/k rows are permuted on export.
    rope_permute: bool = True
    # Linears that carry a bias tensor (Qwen2's q/k/v).
    biased_linears: tuple[str, ...] = ()
    fold_points: tuple[FoldPoint, ...] = (
        FoldPoint("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        FoldPoint("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        FoldPoint("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        FoldPoint("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    )

    def block(self, index: int) -> str:
        return self.block_prefix.format(index=index)

    def linear_weights(self, index: int) -> list[str]:
        """Full tensor names of the block's linear weights, in execution order."""
        return [f"{self.block(index)}{name}.weight" for name in self.linears]


LLAMA = Architecture(name="llama", hf_class="LlamaForCausalLM", gguf_arch="llama")
MISTRAL = Architecture(name="mistral", hf_class="MistralForCausalLM", gguf_arch="llama")
QWEN2 = Architecture(
    name="qwen2",
    hf_class="Qwen2ForCausalLM",
    gguf_arch="qwen2",
    rope_permute=False,
    biased_linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)

ARCHITECTURES: dict[str, Architecture] = {a.hf_class: a for a in (LLAMA, MISTRAL, QWEN2)}


def supported_names() -> str:
    return ", ".join(sorted(ARCHITECTURES))
