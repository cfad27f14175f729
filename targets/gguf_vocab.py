"""Tokenizer metadata for GGUF, read from a Hugging Face ``tokenizer.json``.

Byte-level BPE tokenizers become ``tokenizer.ggml.model = "gpt2"`` with their merges and the
llama.cpp pre-tokenizer whose split rule matches theirs. The pre-tokenizer is identified from the
tokenizer's own definition; one that matches no known rule is an error rather than a file whose
tokenization silently differs from the original.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

# Split regexes of byte-level BPE families -> llama.cpp's name for that pre-tokenizer.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEX_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


@dataclass
class GGUFVocab:
    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    add_bos: bool


def _byte_level(pre: dict) -> bool:
    return pre.get("type") == "ByteLevel"


def detect_pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json ``pre_tokenizer`` entry."""
    if pre is None:
        raise QuantkitError("tokenizer.json has no pre_tokenizer; GGUF export supports byte-level BPE tokenizers")
    if _byte_level(pre) and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if len(steps) == 2 and steps[0].get("type") == "Split" and _byte_level(steps[1]):
            regex = steps[0].get("pattern", {}).get("Regex")
            if regex in SPLIT_REGEX_PRE and not steps[1].get("use_regex", True):
                return SPLIT_REGEX_PRE[regex]
    raise QuantkitError(
        f"cannot identify the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}); quantkit will not write a GGUF "
        "whose tokenization may differ. Supported: GPT-2 byte-level, Llama-3 and Qwen2 split rules"
    )


def read_vocab(model_dir: Path, tokenizer_config: dict | None = None) -> GGUFVocab:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise QuantkitError(f"{model_dir} has no tokenizer.json; GGUF export needs the fast tokenizer file")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise QuantkitError(
            f"tokenizer type {model.get('type')} (byte_fallback={model.get('byte_fallback')}) is not supported "
            "for GGUF yet; only byte-level BPE tokenizers are"
        )
    pre = detect_pre_tokenizer(spec.get("pre_tokenizer"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, tok in added.items():
        vocab[content] = tok["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TOKEN_USER_DEFINED] * size  # ids with no token (holes) stay user-defined padding
    for token, idx in vocab.items():
        tokens[idx] = token
        types[idx] = TOKEN_NORMAL
    for tok in added.values():
        types[tok["id"]] = TOKEN_CONTROL if tok.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    config = tokenizer_config or {}
    bos, eos = config.get("bos_token"), config.get("eos_token")
    return GGUFVocab(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_types=types,
        merges=merges,
        bos_id=vocab.get(bos) if isinstance(bos, str) else None,
        eos_id=vocab.get(eos) if isinstance(eos, str) else None,
        add_bos=bool(config.get("add_bos_token", False)),
    )
