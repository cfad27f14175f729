"""Tiny checkpoints with the configs of checkpoints people download: every field of the published config.json
that is not a size (rope scaling and its parameters, partial rotary factor, head_dim's ratio to the width, tied
embeddings, sliding windows, rope bases, norm epsilon, soft-capping) kept, the sizes shrunk so a test converts
and runs them in seconds. Each carries quantkit's embedded tokenizer (4096 tokens) and a chat template.

The sizes keep what the graphs rely on: heads over KV heads as published (GQA ratio), head_dim explicit where
the config has one, rotary factors of longrope as many as the tiny rotary width needs.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

from quantkit_testing.models import save_tiny

# A chat template in the Jinja dialect transformers and llama.cpp both render, using only text the embedded
# tokenizer knows (the tiny vocabulary has no chat special tokens).
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")

SMALL = dict(vocab_size=4096, intermediate_size=256, num_hidden_layers=2)


def _longrope_factors(n: int, top: float) -> list[float]:
    """An increasing factor per rotary frequency pair, the shape of Phi-4-mini's published long_factor."""
    return [round(1.0 + (top - 1.0) * (i / (n - 1)) ** 2, 4) for i in range(n)]


PUBLISHED = {
    # meta-llama/Llama-3.2-1B-Instruct: llama3 rope (factor 32 over an 8192 original context), tied, GQA 4:1
    "llama-3.2-1b-instruct": lambda: LlamaConfig(
        **SMALL, hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_theta": 500000.0}),
    # Qwen/Qwen2.5-0.5B-Instruct: q/k/v biases, theta 1e6, tied, GQA 7:1 (14 over 2 heads there, 7 over 1 here),
    # no sliding window in use
    "qwen2.5-0.5b-instruct": lambda: Qwen2Config(
        **SMALL, hidden_size=224, num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768,
        max_window_layers=2, rope_theta=1000000.0, bos_token_id=0, eos_token_id=0),
    # Qwen/Qwen3-0.6B: q/k norms, head_dim 128 with 16 heads over hidden 1024 (head_dim = 2 x hidden / heads)
    "qwen3-0.6b": lambda: Qwen3Config(
        **SMALL, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0, bos_token_id=0, eos_token_id=0),
    # google/gemma-3-270m: head_dim 256 with 4 heads / 1 KV head, sliding window 512, local base 10000
    "gemma-3-270m": lambda: Gemma3TextConfig(
        **SMALL, hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=512, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    # google/gemma-3-4b-it (its text model): linear rope scaling 8 on the global layers, window 1024
    "gemma-3-4b-it": lambda: Gemma3TextConfig(
        **SMALL, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=131072, rms_norm_eps=1e-6, sliding_window=1024, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # microsoft/Phi-4-mini-instruct: longrope (long/short factors over a 4096 original context), partial rotary
    # factor 0.75, tied, GQA 3:1, no sliding window; head_dim 64 (128 there) keeps the rotary width (48) one that
    # onnxruntime's GroupQueryAttention takes (half of it a multiple of 8)
    "phi-4-mini-instruct": lambda: Phi3Config(
        **SMALL, hidden_size=384, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True, sliding_window=None,
        partial_rotary_factor=0.75, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        rope_scaling={"rope_type": "longrope", "long_factor": _longrope_factors(24, 40.0),
                      "short_factor": _longrope_factors(24, 1.1), "rope_theta": 10000.0,
                      "original_max_position_embeddings": 4096}),
    # mistralai/Mistral-7B-Instruct-v0.3: theta 1e6, no sliding window, untied, GQA 4:1
    "mistral-7b-instruct-v0.3": lambda: MistralConfig(
        **SMALL, hidden_size=128, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-5, sliding_window=None, rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=0),
}


def save_published(root: Path, name: str) -> Path:
    """The tiny checkpoint of ``name`` with the chat template in its tokenizer_config.json. The tokenizer is saved
    back through the class transformers picks for the family (Qwen2's, for one, imposes its own split rules over
    tokenizer.json's), so tokenizer.json says what transformers does, as in the published checkpoints."""
    from transformers import AutoTokenizer

    folder = save_tiny(root / name, PUBLISHED[name]())
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    if name.startswith("phi-4"):
        config["tokenizer_class"] = "GPT2Tokenizer"  # as Phi-4-mini's: llama.cpp's converter then reads BPE
    config_path.write_text(json.dumps(config, indent=2))
    return folder
