"""Content-addressed build cache: a run's artifacts and manifest stored under the hash of everything that
decides their bytes, so an unchanged rebuild copies them back instead of quantizing and evaluating again.

The key covers the model folder's files (config, tokenizer, weights: by content), the resolved recipe
(with the calibration/evaluation text and any importance-matrix file replaced by their content hashes),
the targets, quantkit's own source files and the versions of Python and of the libraries and runtimes
that write or check artifacts. Output paths and display options are not part of it.

Layout of a cache folder (``QUANTKIT_CACHE`` or ``~/.cache/quantkit/builds`` unless given)::

    cells/<key>/            one finished run: its artifacts, manifest.json and entry.json (file -> sha256)
    resume/<key>/           layer-by-layer passes of an unfinished run (see quantkit.resume)
    file-hashes.json        sha256 of files seen before, by (path, size, mtime): large checkpoints hash once
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.manifest import file_sha256, package_versions

KEY_SCHEMA = "quantkit.cache/1"
ENTRY_FILE = "entry.json"
# Libraries whose version can change an artifact's bytes or its measured accuracy
KEYED_PACKAGES = ("torch", "transformers", "safetensors", "tokenizers", "gguf", "numpy", "llama-cpp-python",
                  "onnx", "onnxruntime", "onnxruntime-genai", "executorch", "torchao", "compressed-tensors",
                  "gptqmodel", "optimum")


def default_cache_dir() -> Path:
    return Path(os.environ.get("QUANTKIT_CACHE") or Path.home() / ".cache" / "quantkit" / "builds")


SOURCE_PACKAGES = ("quantkit", "quantkit.targets", "quantkit.kernels")  # three folders in a source checkout


def quantkit_source_sha256() -> str:
    """One hash over quantkit's own Python files and assets (pipeline, targets, kernels): a code change is a
    new key even at one version number."""
    from importlib.util import find_spec

    h = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        spec = find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            root = Path(folder)
            for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".json", ".txt")
                               and "__pycache__" not in p.parts):
                h.update(f"{package}/{path.relative_to(root).as_posix()}".encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


class FileHashes:
    """sha256 of files, remembered by (resolved path, size, mtime_ns) in a JSON file, so an 8B checkpoint is
    read once, not at every build. A file changed in place gets a new mtime and is hashed again."""

    def __init__(self, store: Path | None):
        self.store = store
        self._known: dict[str, list] = {}
        if store is not None and store.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                self._known = json.loads(store.read_text())
        self._dirty = False

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        known = self._known.get(key)
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
        digest = file_sha256(path)
        self._known[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if self.store is None or not self._dirty:
            return
        self.store.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.store.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._known))
        tmp.replace(self.store)
        self._dirty = False


def folder_sha256(folder: Path, hashes: FileHashes) -> dict[str, str]:
    """Every file of a model folder (relative path -> sha256); hidden files and caches left out."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(folder).parts))
    return {p.relative_to(folder).as_posix(): hashes.sha256(p) for p in files}


def text_source_sha256(source: str, split: str) -> str:
    """The calibration/evaluation text by content: the documents a run would read from ``source``."""
    from quantkit.data import load_documents

    h = hashlib.sha256()
    for doc in load_documents(source, split):
        h.update(doc.encode("utf-8") + b"\0")
    return h.hexdigest()


def run_key_inputs(model_files: dict[str, str], recipe: dict, targets: list[str], hashes: FileHashes) -> dict:
    """What a run's key hashes, readable (it is stored in the cache entry for whoever asks why a key changed)."""
    resolved = dict(recipe)
    for field, split in (("calib", "calib"), ("eval", "eval")):
        resolved[field] = {"sha256": text_source_sha256(str(resolved[field]), split)}
    if resolved.get("imatrix") not in (None, "none", "calib"):
        resolved["imatrix"] = {"sha256": hashes.sha256(Path(str(resolved["imatrix"])))}
    from quantkit import __version__

    return {"schema": KEY_SCHEMA, "model": model_files, "recipe": resolved, "targets": sorted(targets),
            "quantkit": {"version": __version__, "source_sha256": quantkit_source_sha256()},
            "python": sys.version.split()[0], "packages": package_versions(KEYED_PACKAGES)}


def key_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass
class CacheHit:
    key: str
    entry: Path


class BuildCache:
    """A cache folder: look up a key (checked file by file against the hashes stored with it), store a
    finished run's output, give a run its resume folder."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        try:
            (self.root / "cells").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QuantkitError(f"cannot use cache folder {self.root} ({exc.strerror}); pass a writable --cache "
                                "folder or --no-cache") from None
        self.file_hashes = FileHashes(self.root / "file-hashes.json")

    def entry(self, key: str) -> Path:
        return self.root / "cells" / key

    def resume_dir(self, key: str) -> Path:
        return self.root / "resume" / key

    def holds(self, key: str) -> bool:
        """Whether an entry for ``key`` is there (not re-hashed: ``lookup`` checks its files when it is used)."""
        return (self.entry(key) / ENTRY_FILE).is_file()

    def lookup(self, key: str) -> tuple[CacheHit | None, str | None]:
        """``(hit, None)``; or ``(None, why)`` when an entry exists but is damaged (it is then removed), or
        ``(None, None)`` when there is none."""
        entry = self.entry(key)
        listing = entry / ENTRY_FILE
        if not listing.is_file():
            return None, None
        try:
            files = json.loads(listing.read_text())["files"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            files = None
        damaged = "its file list is unreadable" if files is None else _first_mismatch(entry, files)
        if damaged:
            shutil.rmtree(entry, ignore_errors=True)
            return None, damaged
        return CacheHit(key, entry), None

    def store(self, key: str, out: Path, names: list[str], inputs: dict) -> None:
        """Copy ``names`` (files or folders in ``out``, manifest.json included) into the entry for ``key``:
        written beside it and renamed into place, so a reader never sees half an entry."""
        final = self.entry(key)
        if final.exists():
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=self.root / "cells"))
        try:
            for name in names:
                _copy(out / name, tmp / name)
            files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / ENTRY_FILE).write_text(json.dumps({"key": key, "inputs": inputs, "files": files}, indent=1))
            with contextlib.suppress(OSError):  # another process stored the same key first: keep theirs
                tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Runs of one key at a time (two executors on a shared cache compute a cell once, then hit)."""
        (self.root / "locks").mkdir(exist_ok=True)
        with open(self.root / "locks" / key, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _first_mismatch(entry: Path, files: dict[str, str]) -> str | None:
    for name, digest in files.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its stored sha256"
    return None


def restore(hit: CacheHit, dest: Path) -> list[str]:
    """Copy a cache entry's files (not its entry.json) into ``dest``; returns the top-level names copied."""
    names = sorted(p.name for p in hit.entry.iterdir() if p.name != ENTRY_FILE)
    for name in names:
        _copy(hit.entry / name, dest / name)
    return names


def _copy(source: Path, dest: Path) -> None:
    """A file or a whole folder (an artifact folder such as hf-gptq/)."""
    if source.is_dir():
        shutil.copytree(source, dest)
    else:
        shutil.copy2(source, dest)
