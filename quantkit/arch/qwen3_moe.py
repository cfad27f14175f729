"""Qwen3-MoE: Qwen3's attention (q/k norms, NEOX rope) with a mixture-of-experts MLP (``mlp``: router
``gate``, ``num_experts`` experts of width ``moe_intermediate_size``). llama.cpp's ``qwen3moe`` always
renormalises the chosen experts' weights and runs experts in every layer, so a checkpoint with
``norm_topk_prob`` off or dense layers (``mlp_only_layers``, ``decoder_sparse_step`` > 1) is refused for
GGUF rather than written to compute another model."""

from __future__ import annotations

from dataclasses import dataclass

from quantkit.arch.base import LLAMA_GGUF_NAMES, LLAMA_LINEARS, Architecture, Experts, FoldPoint
from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class Qwen3Moe(Architecture):
    def bind(self, config: dict) -> Architecture:
        check_all_sparse(self, config)  # a dense layer has no experts to load or quantize
        return super().bind(config)

    def check_gguf(self, config: dict) -> None:
        super().check_gguf(config)
        if not config.get("norm_topk_prob", False):
            raise QuantkitError(f"{self.name}: norm_topk_prob is off, but llama.cpp always renormalises the chosen "
                                "experts' weights; this checkpoint cannot be exported to GGUF")


def check_all_sparse(arch: Architecture, config: dict) -> None:
    if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
        raise QuantkitError(f"{arch.name}: dense MLP layers between the expert layers (mlp_only_layers / "
                            "decoder_sparse_step) are not supported yet; only all-expert models are")


QWEN3_MOE = Qwen3Moe(
    name="qwen3_moe",
    hf_class="Qwen3MoeForCausalLM",
    gguf_arch="qwen3moe",
    rope_permute=False,
    qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
    linears=LLAMA_LINEARS[:4],
    linear_groups=(LLAMA_LINEARS[:3], (LLAMA_LINEARS[3],)),
    gguf_block_names={**{k: v for k, v in LLAMA_GGUF_NAMES.items() if not k.startswith("mlp.")},
                      "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
    fold_points=(
        FoldPoint("input_layernorm", LLAMA_LINEARS[:3], "self_attn"),
        FoldPoint("self_attn.v_proj", (LLAMA_LINEARS[3],), "self_attn.o_proj"),
        FoldPoint("post_attention_layernorm", ("mlp.gate",), "mlp"),
    ),
    experts=Experts(module="mlp", count_keys=("num_experts", "num_local_experts"), width_key="moe_intermediate_size",
                    normalize_key="norm_topk_prob"),
)

FAMILIES = (QWEN3_MOE,)
