"""Tiny random checkpoints of each supported architecture, saved as HF folders.

They reuse the embedded model's tokenizer so GGUF export (which needs a real tokenizer) works.
Random weights say nothing about accuracy; accuracy tests use the embedded trained model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from quantkit.model import default_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TINY = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)


def save_tiny(path: Path, config, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init scales are tiny; widen them so quantization error is visible
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir() / name, path / name)
    return path


TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "llama-tied": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=False),
    # head_dim 48 is not hidden / heads (32): Qwen3 sets it on its own
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=48, tie_word_embeddings=True),
    # 256-wide rows so llama.cpp's k-quant rules (attn_qkv's own) apply rather than their fallbacks
    "phi3": lambda: Phi3Config(**{**TINY, "hidden_size": 256, "intermediate_size": 512}, pad_token_id=0,
                               tie_word_embeddings=False),
    # query_pre_attn_scalar = head_dim, as llama.cpp assumes below 27B; soft-capping at Gemma 2's defaults
    "gemma2": lambda: Gemma2Config(**TINY, head_dim=32, query_pre_attn_scalar=32),
    "gemma3": lambda: Gemma3TextConfig(**TINY, head_dim=32, query_pre_attn_scalar=32),
    # 8 experts: llama.cpp's quantizer has rules for exactly that count; 256-wide rows so k-quants apply
    "mixtral": lambda: MixtralConfig(**{**TINY, "hidden_size": 256}, num_local_experts=8, num_experts_per_tok=2,
                                     sliding_window=None, tie_word_embeddings=False),
    # odd sizes: hidden 96 (not a multiple of 128), one KV head; 16 experts, 2 per token, so that short
    # calibration leaves some experts with few tokens (the fallback's case)
    "qwen3_moe": lambda: Qwen3MoeConfig(**{**TINY, "hidden_size": 96, "num_key_value_heads": 1}, head_dim=32,
                                        num_experts=16, num_experts_per_tok=2, moe_intermediate_size=64,
                                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                        tie_word_embeddings=False),
}
