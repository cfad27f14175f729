"""manifest.json: what was built, from what, how it was checked, and with which versions."""

from __future__ import annotations

import hashlib
import json
import platform
import threading
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

SCHEMA_VERSION = 1
_PACKAGES = ("torch", "transformers", "safetensors", "tokenizers", "gguf", "numpy", "llama-cpp-python", "gptqmodel",
             "optimum")


def file_sha256(path: Path, cancelled: threading.Event | None = None) -> str:
    """The file's sha256; with ``cancelled`` set midway, stops and returns an empty string."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            if cancelled is not None and cancelled.is_set():
                return ""
            h.update(chunk)
    return h.hexdigest()


class BackgroundHashes:
    """sha256 of files computed on a thread (hashlib and file reads release the GIL, so it runs on whatever
    core the quantization leaves idle). ``result()`` waits; ``cancel()`` stops it, e.g. when the run fails."""

    def __init__(self, files: list[Path]):
        self._cancelled = threading.Event()
        self._result: dict[str, str] = {}
        self._thread = threading.Thread(target=self._work, args=(files,), name="quantkit-hash", daemon=True)
        self._thread.start()

    def _work(self, files: list[Path]) -> None:
        for file in files:
            self._result[file.name] = file_sha256(file, self._cancelled)

    def result(self) -> dict[str, str]:
        self._thread.join()
        return dict(self._result)

    def cancel(self) -> None:
        self._cancelled.set()


class KnownHashes:
    """``BackgroundHashes``' interface for hashes already computed (e.g. for a build cache's key)."""

    def __init__(self, hashes: dict[str, str]):
        self._hashes = dict(hashes)

    def result(self) -> dict[str, str]:
        return dict(self._hashes)

    def cancel(self) -> None:
        pass


def artifact_digest(path: Path) -> tuple[int, str]:
    """Size in bytes and sha256 of a file, or of a folder (over its files' relative paths and hashes)."""
    if path.is_file():
        return path.stat().st_size, file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{p.relative_to(path).as_posix()}\t{file_sha256(p)}\n" for p in files)
    return sum(p.stat().st_size for p in files), hashlib.sha256(listing.encode()).hexdigest()


def package_versions(names) -> dict[str, str | None]:
    """Installed version of each distribution in ``names`` (None where it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "packages": package_versions(_PACKAGES)}


def write_manifest(path: Path, *, artifacts, **fields) -> dict:
    manifest = {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **fields,
        "artifacts": [asdict(a) for a in artifacts],
        "accepted": all(a.verdict == "accepted" for a in artifacts),
    }
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
