"""Tokenizer metadata for GGUF, read from a Hugging Face ``tokenizer.json``.

Byte-level BPE tokenizers become ``tokenizer.ggml.model = "gpt2"`` with their merges and the
llama.cpp pre-tokenizer whose split rule matches theirs. Sentencepiece-style BPE tokenizers
(Llama-2, Mistral v0.1, Phi-3, Gemma: byte fallback, spaces as "▁") become ``tokenizer.ggml.model = "llama"``:
tokens, scores and token types, where llama.cpp merges the adjacent pair whose result scores
highest, so each token scores minus the rank of the merge that makes it. The pre-tokenizer is
identified from the tokenizer's own definition; one that matches no known rule is an error rather
than a file whose tokenization silently differs from the original.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from quantkit.errors import QuantkitError

# llama.cpp's token types (gguf.TokenType)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
SPM_SPACE = "\u2581"  # "▁": sentencepiece's visible space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Llama-2's older tokenizer.json spells the space handling as a normalizer instead of a Metaspace pre-tokenizer
SPM_NORMALIZER = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPM_SPACE},
                                                      {"type": "Replace", "pattern": {"String": " "},
                                                       "content": SPM_SPACE}]}
# Gemma's tokenizer.json: spaces become "▁" with no prefix added; its Split on " " (Gemma 2/3) never fires,
# since the normalizer has already replaced every space before the pre-tokenizer runs
GEMMA_NORMALIZER = {"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE}
GEMMA_SPLIT = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}

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
    scores: list[float] | None = None  # "llama" (sentencepiece-style) vocabularies only
    unk_id: int | None = None
    add_space_prefix: bool | None = None  # "llama": prepend "▁" to the text, as the tokenizer does


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


def read_vocab(model_dir: Path, tokenizer_config: dict | None = None, vocab_size: int | None = None) -> GGUFVocab:
    """The GGUF vocabulary of ``model_dir``'s tokenizer.json; with ``vocab_size`` (the embedding's rows) the
    token list is padded to it, as llama.cpp's converter does for models whose embedding has spare rows."""
    vocab = _cached_vocab(model_dir, json.dumps(tokenizer_config or {}, sort_keys=True),
                          (model_dir / "tokenizer.json").stat().st_mtime_ns
                          if (model_dir / "tokenizer.json").is_file() else 0)
    vocab = replace(vocab, tokens=list(vocab.tokens), token_types=list(vocab.token_types),
                    scores=None if vocab.scores is None else list(vocab.scores))
    if vocab_size is None or len(vocab.tokens) == vocab_size:
        return vocab
    if len(vocab.tokens) > vocab_size:
        raise QuantkitError(f"tokenizer.json has {len(vocab.tokens)} tokens but the model's embedding has "
                            f"{vocab_size} rows; use the tokenizer that belongs to this checkpoint")
    spare = range(len(vocab.tokens), vocab_size)
    vocab.tokens += [f"[PAD{i}]" for i in spare]
    vocab.token_types += [TOKEN_UNUSED if vocab.scores is not None else TOKEN_USER_DEFINED] * len(spare)
    if vocab.scores is not None:
        vocab.scores += [min(vocab.scores, default=0.0)] * len(spare)
    return vocab


@lru_cache(maxsize=4)
def _cached_vocab(model_dir: Path, tokenizer_config: str, _mtime: int) -> GGUFVocab:
    """``_read_vocab``, parsed once per tokenizer file (validation and export both need it)."""
    return _read_vocab(model_dir, json.loads(tokenizer_config))


def _read_vocab(model_dir: Path, tokenizer_config: dict | None) -> GGUFVocab:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise QuantkitError(f"{model_dir} has no tokenizer.json; GGUF export needs the fast tokenizer file")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _sentencepiece_vocab(spec, tokenizer_config or {})
    if model.get("type") != "BPE":
        raise QuantkitError(
            f"tokenizer type {model.get('type')} (byte_fallback={model.get('byte_fallback')}) is not supported "
            "for GGUF yet; only BPE tokenizers are (byte-level, or sentencepiece-style with byte fallback)"
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


def space_prefix(spec: dict) -> bool:
    """Whether a sentencepiece-style tokenizer.json prepends "▁"; an unknown space rule is an error."""
    pre, norm = spec.get("pre_tokenizer"), spec.get("normalizer")
    if norm is None and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == SPM_SPACE \
            and not pre.get("split", True):
        # without special tokens in the text, "first" and "always" both prefix once, as llama.cpp does
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        return scheme != "never"
    if pre is None and norm == SPM_NORMALIZER:
        return True
    if norm == GEMMA_NORMALIZER and pre in (None, GEMMA_SPLIT):
        return False
    raise QuantkitError(
        f"cannot identify the tokenizer's pre-tokenizer (normalizer {json.dumps(norm)[:80]}, pre_tokenizer "
        f"{json.dumps(pre)[:80]}); quantkit will not write a GGUF whose tokenization may differ. Supported for "
        "byte-fallback BPE: Metaspace with split false, Llama-2's Prepend/Replace normalizer or Gemma's Replace"
    )


def _merge_scores(merges: list) -> dict[str, float]:
    """Minus the rank of the first merge that makes each token: llama.cpp then merges in HF's order."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _sentencepiece_vocab(spec: dict, config: dict) -> GGUFVocab:
    add_space_prefix = space_prefix(spec)
    model = spec["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    size = max(list(vocab.values()) + [t["id"] for t in added.values()]) + 1
    merge_scores = _merge_scores(model.get("merges", []))
    never = -float(len(merge_scores) + 1)  # multi-character tokens no merge makes: merged last
    tokens, types, scores = [f"[PAD{i}]" for i in range(size)], [TOKEN_UNUSED] * size, [never] * size
    for token, idx in vocab.items():
        tokens[idx] = token
        types[idx] = TOKEN_BYTE if BYTE_TOKEN.fullmatch(token) else TOKEN_NORMAL
        scores[idx] = merge_scores.get(token, 0.0 if len(token) == 1 else never)
    unk = model.get("unk_token") or _token_name(config.get("unk_token"))
    for content, tok in added.items():
        # llama.cpp matches user-defined tokens in raw text, where spaces are still spaces
        tokens[tok["id"]] = content if tok.get("special") else content.replace(SPM_SPACE, " ")
        types[tok["id"]] = TOKEN_CONTROL if tok.get("special") else TOKEN_USER_DEFINED
        scores[tok["id"]] = 0.0
    ids = {token: i for i, token in enumerate(tokens)}
    if unk in ids:
        types[ids[unk]] = TOKEN_UNKNOWN
    bos, eos = _token_name(config.get("bos_token")), _token_name(config.get("eos_token"))
    return GGUFVocab(model="llama", pre="default", tokens=tokens, token_types=types, merges=[],
                     bos_id=ids.get(bos), eos_id=ids.get(eos), add_bos=_adds_bos(spec, config, bos),
                     scores=scores, unk_id=ids.get(unk), add_space_prefix=add_space_prefix)


def _token_name(value) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _adds_bos(spec: dict, config: dict, bos: str | None) -> bool:
    """tokenizer_config's add_bos_token, else whether tokenizer.json's template starts with the BOS token."""
    if "add_bos_token" in config:
        return bool(config["add_bos_token"])
    single = (spec.get("post_processor") or {}).get("single") or [{}]
    return bos is not None and single[0].get("SpecialToken", {}).get("id") == bos


def special_vocab(model_dir: Path, vocab: GGUFVocab):
    """The checkpoint's special tokens as llama.cpp's converter writes them: gguf-py's ``SpecialVocab`` reads
    tokenizer_config.json, special_tokens_map.json, chat_template.jinja / .json and config.json (bos, eos, unk,
    sep, pad, ... ids, add_bos / add_eos, the chat template); quantkit's own reading of the vocabulary, which the
    tokenizer tests check against llama.cpp, decides bos, eos, unk and add_bos where it has an answer."""
    import gguf

    special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(vocab.tokens))
    for kind, token_id in (("bos", vocab.bos_id), ("eos", vocab.eos_id), ("unk", vocab.unk_id)):
        if token_id is not None:
            special.special_token_ids[kind] = token_id
    special.add_special_token["bos"] = vocab.add_bos
    return special


# llama.cpp gives these tokens Phi-3's strip rules in any file whose general.name contains "phi3" or "phi-3", and
# fails to load one whose vocabulary lacks any of them (std::out_of_range at load)
PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)
PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def gguf_model_name(name: str, vocab: GGUFVocab) -> str:
    """``general.name`` for the file: the folder's name, unless llama.cpp's Phi-3 rule would make it unloadable
    (then "phi3" / "phi-3" become "phi 3")."""
    if PHI3_NAME.search(name) and not set(PHI3_TOKENS) <= set(vocab.tokens):
        return PHI3_NAME.sub(lambda m: f"{m.group(0)[:3]} 3", name)
    return name
