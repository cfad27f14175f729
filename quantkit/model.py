"""Local Hugging Face checkpoint folders, read lazily.

``ModelSource`` validates a folder (config, architecture, safetensors headers and sizes) without
reading any weights; tensors are then read one at a time, so a quantization pass holds at most
one block in full precision.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.arch import ARCHITECTURES, Architecture, supported_names
from quantkit.errors import QuantkitError
from quantkit.manifest import BackgroundHashes, file_sha256

# Everything works from local paths: never let transformers reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "default"
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def default_model_dir() -> Path:
    return Path(str(resources.files("quantkit") / "assets" / "default_model"))


def read_safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header; a truncated or corrupt file is a QuantkitError."""
    fix = "re-download or re-save the checkpoint"
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise QuantkitError(f"{path} is truncated (no safetensors header); {fix}")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise QuantkitError(f"{path} is corrupt or truncated (header length {header_len} > file size); {fix}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QuantkitError(f"{path} has a corrupt safetensors header; {fix}") from None
    header.pop("__metadata__", None)
    data_len = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + header_len + data_len > size:
        raise QuantkitError(
            f"{path} is truncated: its header needs {8 + header_len + data_len} bytes, the file has {size}; {fix}"
        )
    for info in header.values():
        info["file_offset"] = 8 + header_len + info["data_offsets"][0]
    return header


TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
# Row chunks read for streaming quantization: at most this many bytes of float32 rows at a time.
ROW_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # where the tensor's data starts in ``file``

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    # one sum is finite when every value is (a float32 sum of huge finite values can overflow: then look closer)
    if torch.isfinite(tensor.sum()) or torch.isfinite(tensor).all():
        return
    bad = int((~torch.isfinite(tensor)).sum())
    raise QuantkitError(f"tensor {name} holds {bad} NaN/Inf values; the checkpoint is broken, fix or retrain it")


# Files beside config.json that the tokenizer loaders, the GGUF vocabulary and the runtimes' folders read
JSON_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class ModelSource:
    """A validated checkpoint folder whose tensors are read on demand."""

    def __init__(self, path: str | Path | None = None):
        self.is_default = path in (None, DEFAULT_MODEL)
        self.path = default_model_dir() if self.is_default else Path(path)
        self.config = self._read_config()
        self._check_json_files()
        self.arch = self._resolve_architecture()
        self.tensors = self._index_tensors()

    # ---- validation -------------------------------------------------------------------------
    def _read_config(self) -> dict:
        if not self.path.exists():
            raise QuantkitError(f"model folder {self.path} does not exist; pass a local Hugging Face checkpoint folder")
        if not self.path.is_dir():
            raise QuantkitError(f"model path {self.path} is not a folder; pass the checkpoint folder, not a file")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise QuantkitError(f"{self.path} has no config.json; it is not a Hugging Face checkpoint folder")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise QuantkitError(f"{config_path} is not valid JSON ({exc}); fix or re-save the config") from None
        if not isinstance(config, dict):
            raise QuantkitError(f"{config_path} is not a JSON object; fix or re-save the config")
        return config

    def _check_json_files(self) -> None:
        """The tokenizer and generation files every target reads: a damaged one is named here, before any work
        (transformers' own error for it is a bare JSONDecodeError deep inside the tokenizer loader)."""
        for name in JSON_SIDE_FILES:
            path = self.path / name
            if not path.is_file():
                continue
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise QuantkitError(f"{path} is not valid JSON ({exc}); restore it from the original checkpoint "
                                    "or re-save the tokenizer with save_pretrained") from None

    def _resolve_architecture(self) -> Architecture:
        names = self.config.get("architectures") or []
        for name in names:
            if name in ARCHITECTURES:
                return ARCHITECTURES[name].bind(self.config)
        found = ", ".join(names) if names else "none listed in config.json 'architectures'"
        raise QuantkitError(f"unsupported architecture ({found}); supported: {supported_names()}")

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise QuantkitError(f"{index} is not a valid safetensors index; re-save the checkpoint") from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise QuantkitError(f"shards listed in {index.name} are missing: {', '.join(missing)}; copy them in")
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        if list(self.path.glob("*.bin")):
            raise QuantkitError(
                f"{self.path} has only PyTorch .bin weights; re-save with safe_serialization=True (safetensors)"
            )
        raise QuantkitError(f"{self.path} has no model.safetensors or model.safetensors.index.json")

    def _index_tensors(self) -> dict[str, TensorInfo]:
        tensors = {}
        for file in self._weight_files():
            for name, info in read_safetensors_header(file).items():
                tensors[name] = TensorInfo(name, file, info["dtype"], tuple(info["shape"]), info["file_offset"])
        if self.arch.embedding not in tensors:
            raise QuantkitError(f"{self.path} lacks {self.arch.embedding}; the checkpoint is incomplete")
        return tensors

    # ---- properties -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def tied_embeddings(self) -> bool:
        return self.arch.lm_head not in self.tensors

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @cached_property
    def weight_files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def weight_sha256(self) -> dict[str, str]:
        return {file.name: file_sha256(file) for file in self.weight_files}

    def weight_sha256_in_background(self) -> BackgroundHashes:
        """Start hashing the weight files on a thread; ``.result()`` waits for the hashes."""
        return BackgroundHashes(self.weight_files)

    # ---- tensors ----------------------------------------------------------------------------
    def load(self, name: str) -> torch.Tensor:
        """Read one tensor (float32 for floating types) and reject NaN/Inf."""
        info = self.tensors.get(name)
        if info is None:
            raise QuantkitError(f"tensor {name} is missing from {self.path}; the checkpoint is incomplete")
        try:
            with safe_open(info.file, framework="pt") as f:
                tensor = f.get_tensor(name)
        except Exception as exc:  # safetensors raises several types for damaged files
            raise QuantkitError(f"cannot read {name} from {info.file} ({exc}); re-save the checkpoint") from None
        if tensor.is_floating_point():
            tensor = tensor.float()
            _check_finite(name, tensor)
        return tensor

    def load_stored(self, name: str) -> torch.Tensor:
        """A float tensor in the checkpoint's own dtype (bf16 stays bf16), NaN/Inf rejected."""
        info = self.tensors.get(name)
        if info is None:
            raise QuantkitError(f"tensor {name} is missing from {self.path}; the checkpoint is incomplete")
        rows = info.shape[0] if info.shape else 1
        numel = info.numel
        width = SAFETENSORS_DTYPE_BYTES[info.dtype]
        buffer = bytearray(numel * width)
        try:
            with info.file.open("rb") as f:
                f.seek(info.offset)
                if f.readinto(buffer) != len(buffer):
                    raise OSError("short read")
        except OSError as exc:
            raise QuantkitError(f"cannot read {name} from {info.file} ({exc}); re-save the checkpoint") from None
        tensor = torch.frombuffer(buffer, dtype=TORCH_DTYPES[info.dtype]).reshape(info.shape)
        step = max(1, ROW_CHUNK_BYTES // max(4 * numel // rows, 1))
        for start in range(0, rows, step):  # float32 copies of a chunk at a time, for the check
            _check_finite(name, tensor[start : start + step].float())
        return tensor

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a floating-point matrix as float32, read with plain file reads (no
        memory map, so a streamed pass over a large checkpoint never holds more than the rows it asked for)."""
        info = self.tensors.get(name)
        if info is None:
            raise QuantkitError(f"tensor {name} is missing from {self.path}; the checkpoint is incomplete")
        dtype = TORCH_DTYPES.get(info.dtype)
        if dtype is None or not dtype.is_floating_point or len(info.shape) != 2:
            raise QuantkitError(f"tensor {name} ({info.dtype}, shape {info.shape}) is not a float matrix")
        row_bytes = info.shape[1] * SAFETENSORS_DTYPE_BYTES[info.dtype]
        buffer = bytearray((stop - start) * row_bytes)
        try:
            with info.file.open("rb") as f:
                f.seek(info.offset + start * row_bytes)
                if f.readinto(buffer) != len(buffer):
                    raise OSError("short read")
        except OSError as exc:
            raise QuantkitError(f"cannot read {name} from {info.file} ({exc}); re-save the checkpoint") from None
        rows = torch.frombuffer(buffer, dtype=dtype).reshape(stop - start, info.shape[1]).float()
        _check_finite(name, rows)
        return rows

    def row_chunks(self, name: str, multiple: int = 1, max_bytes: int = ROW_CHUNK_BYTES):
        """``(start, rows)`` of a float matrix in chunks of at most ``max_bytes`` of float32 (a whole number
        of ``multiple`` rows, e.g. one attention head, per chunk), read one chunk at a time."""
        n_rows, n_cols = self.tensors[name].shape
        step = max(multiple, (max_bytes // (4 * n_cols)) // multiple * multiple)
        for start in range(0, n_rows, step):
            yield start, self.load_rows(name, start, min(start + step, n_rows))

    def check_finite(self) -> None:
        """Read every tensor once so a NaN/Inf fails before any output is produced."""
        for name in self.tensors:
            self.load(name)

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except Exception as exc:
            raise QuantkitError(f"cannot load the tokenizer in {self.path} ({exc}); add tokenizer.json") from None

    def hf_model(self, dtype: torch.dtype = torch.float32, progress: bool = False):
        """The whole unquantized model in transformers (used for reference logits)."""
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        if progress:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        model.eval()
        return model
