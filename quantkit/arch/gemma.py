"""Gemma 2 and Gemma 3 (text): Llama's linears with a GeGLU MLP, RMSNorms that scale by (1 + weight),
a norm after attention and after the MLP besides the two before them, embeddings scaled by
sqrt(hidden_size), sliding-window layers between global ones; Gemma 2 soft-caps attention scores and
final logits, Gemma 3 adds q/k norms and a second rope base for its sliding layers.

GGUF (llama.cpp's ``gemma2`` / ``gemma3``): every norm is stored as 1 + weight (what llama.cpp's
converter writes), tensor names ``post_attention_norm`` / ``post_ffw_norm`` for the extra norms, NEOX rope (no
row permute); llama.cpp scales embeddings and queries itself (queries by 1/sqrt(head_dim), so
``query_pre_attn_scalar`` must equal ``head_dim``, as in the 2B-12B checkpoints) and fixes the layer
pattern (Gemma 2: every other layer sliding, Gemma 3: five sliding then one global; its sliding layers' rope
base is ``rope.freq_base_swa``, its global layers' linear scaling of the 4B+ checkpoints the scaling keys).
"""

from __future__ import annotations

from dataclasses import dataclass

from quantkit.arch.base import LLAMA_GGUF_NAMES, Architecture, FoldPoint, hparam
from quantkit.arch.rope import rope_of, write_gguf_scaling
from quantkit.errors import QuantkitError

GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm")
GEMMA_GGUF_NAMES = {**LLAMA_GGUF_NAMES, "post_attention_layernorm": "post_attention_norm",
                    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
GEMMA_FOLDS = (
    FoldPoint("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    FoldPoint("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    FoldPoint("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    FoldPoint("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


@dataclass(frozen=True)
class Gemma(Architecture):
    def write_gguf_hparams(self, w, config: dict, n_layers: int) -> None:
        self.check_gguf(config)  # Gemma's head_dim is explicit (checked there), never hidden / heads
        self.write_gguf_shape(w, config, n_layers)
        rope = rope_of(config)
        w.add_rope_freq_base(rope.theta)
        write_gguf_scaling(w, rope)  # Gemma 3 4B+: linear, global layers only, as in transformers
        if rope.sliding_theta is not None:
            w.add_rope_freq_base_swa(rope.sliding_theta)
        if config.get("sliding_window"):
            w.add_sliding_window(int(config["sliding_window"]))
        if config.get("attn_logit_softcapping"):
            w.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        if config.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))

    def check_gguf(self, config: dict) -> None:
        super().check_gguf(config)
        head_dim = hparam(config, "head_dim")
        scalar = config.get("query_pre_attn_scalar", head_dim)
        if scalar != head_dim:
            raise QuantkitError(f"{self.name}: query_pre_attn_scalar {scalar} differs from head_dim {head_dim}; "
                                "llama.cpp scales queries by 1/sqrt(head_dim) for this size, so the GGUF would "
                                "compute another model")


def _gemma(name: str, hf_class: str, **fields) -> Gemma:
    return Gemma(name=name, hf_class=hf_class, gguf_arch=name, norms=GEMMA_NORMS, rope_permute=False,
                 fold_points=GEMMA_FOLDS, norm_offset=1.0, activation="gelu_tanh", **fields)


GEMMA2 = _gemma("gemma2", "Gemma2ForCausalLM", gguf_block_names=dict(GEMMA_GGUF_NAMES))
GEMMA3 = _gemma("gemma3", "Gemma3ForCausalLM",
                qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
                gguf_block_names={**GEMMA_GGUF_NAMES, "self_attn.q_norm": "attn_q_norm",
                                  "self_attn.k_norm": "attn_k_norm"})

FAMILIES = (GEMMA2, GEMMA3)
