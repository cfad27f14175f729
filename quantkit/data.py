"""Calibration and evaluation text.

The built-in corpus is the running interpreter's standard library (``.py`` files only, no
site-packages, no test folders). Every file is assigned to one split by a hash of its path
relative to the standard library root, so the split is deterministic and the calibration and
evaluation files never overlap the files the embedded model was trained on.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

SPLITS = ("train", "calib", "eval")
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# Share of files per split, out of 100 hash buckets.
_SPLIT_BUCKETS = {"train": range(0, 90), "calib": range(90, 95), "eval": range(95, 100)}
BUILTIN = "builtin"
DOC_SEPARATOR = "\n\n"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """The split a standard-library file belongs to, from the sha256 of its relative path."""
    bucket = int(hashlib.sha256(relative_path.encode()).hexdigest()[:8], 16) % 100
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def stdlib_files(split: str, root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library that fall into ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = root or stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        if split_of(rel.as_posix()) == split:
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_text_file(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def builtin_documents(split: str) -> list[str]:
    docs = (read_text_file(p) for p in stdlib_files(split))
    return [d for d in docs if d]


def _documents_from_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        text = read_text_file(path)
        if text is None:
            raise QuantkitError(f"cannot read {path} as UTF-8 text; convert it to UTF-8")
        return [text]
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QuantkitError(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix that line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise QuantkitError(f'{path}:{lineno} has no string "text" field; each line needs one')
            docs.append(record["text"])
        return docs
    raise QuantkitError(f"unsupported text file {path}; use .txt, .jsonl (a 'text' field per line) or a folder")


def load_documents(source: str | Path, split: str) -> list[str]:
    """Documents from ``builtin`` (the stdlib split), a .txt/.jsonl file, or a folder of them."""
    if str(source) == BUILTIN:
        return builtin_documents(split)
    path = Path(source)
    if not path.exists():
        raise QuantkitError(f"text source {path} does not exist; pass a .txt/.jsonl file, a folder or 'builtin'")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise QuantkitError(f"folder {path} holds no .txt or .jsonl files; add some or pass 'builtin'")
        return [doc for f in files for doc in _documents_from_file(f)]
    return _documents_from_file(path)


@dataclass(frozen=True)
class TokenSamples:
    """Fixed-length token sequences cut from a text source."""

    source: str
    ids: torch.Tensor  # (n_samples, seq_len) int64
    sha256: str  # of the token ids, so a manifest pins exactly what was measured

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()


def tokenize_documents(tokenizer, docs: Iterable[str], eos_id: int | None) -> list[int]:
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer.encode(doc, add_special_tokens=False))
        if eos_id is not None:
            stream.append(eos_id)
    return stream


def make_samples(tokenizer, source: str | Path, split: str, n_samples: int, seq_len: int) -> TokenSamples:
    """Concatenate the documents, tokenize, and cut ``n_samples`` consecutive windows of ``seq_len``."""
    if n_samples < 1 or seq_len < 2:
        raise QuantkitError(f"need at least 1 sample of at least 2 tokens (got {n_samples} x {seq_len})")
    docs = load_documents(source, split)
    needed = n_samples * seq_len
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer.encode(doc, add_special_tokens=False))
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise QuantkitError(
            f"text source {source} gives {len(stream)} tokens but {n_samples} samples x {seq_len} tokens "
            f"need {needed}; add text or lower the number of samples / sequence length"
        )
    ids = torch.tensor(stream[:needed], dtype=torch.int64).view(n_samples, seq_len)
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    return TokenSamples(source=str(source), ids=ids, sha256=digest)
