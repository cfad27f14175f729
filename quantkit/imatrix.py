"""Importance matrices (llama.cpp's "imatrix"): how much each input column of each linear matters.

For a linear y = W x, the error that rounding W adds to y on input x is sum_j (dW_ij x_j); over
calibration tokens its expected square weighs column j by E[x_j^2]. An importance matrix is that
mean square per input column, collected from calibration text; GGUF quantizers use it to weight
their error objective (quantkit.grids), so columns fed by large activations are rounded more carefully.

Files are the two formats llama.cpp 0.3.36's tools read and write, with GGUF tensor names
(``blk.0.attn_q.weight``); both are read and written here, so an imatrix made by llama-imatrix can be
used by quantkit and ours can be given to llama-quantize:
  * GGUF (llama-imatrix's default): per weight ``<name>.in_sum2`` (F32, ne = [n_in, 1]: sum of x_j^2
    over tokens) and ``<name>.counts`` (F32, ne = [1, 1]: the token count); keys ``general.type`` =
    "imatrix", ``imatrix.datasets`` (string array), ``imatrix.chunk_count``, ``imatrix.chunk_size`` (u32).
  * legacy ``.dat``: int32 n_entries; per entry int32 name length, name bytes, int32 ncall, int32 nval,
    float32[nval] holding mean * ncall; then optionally int32 chunk count, int32 length + dataset name.
llama-quantize turns either into importance = in_sum2 / counts (GGUF; 1 where counts is 0) or
values / ncall (legacy), in fp32; ``ImportanceMatrix.values`` does the same.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch

from quantkit.arch import Architecture
from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.model import ModelSource

SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
GGUF_FILENAME = "imatrix.gguf"


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32 (n_in,): sum of x_j^2 over tokens (legacy files: mean * ncall)
    count: int  # tokens (legacy files: ncall)


@dataclass
class ImportanceMatrix:
    """An importance matrix keyed by GGUF tensor name, as llama.cpp's files hold it."""

    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file: sums are mean * ncall and count is ncall

    def values(self, name: str) -> np.ndarray | None:
        """The fp32 importance per input column of ``name``, computed as llama-quantize does, or None."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        if entry.count > 0:
            return entry.sums / np.float32(entry.count)
        return entry.sums.copy() if self.legacy else np.ones_like(entry.sums)


def gguf_weight_names(arch: Architecture, n_layers: int) -> dict[str, str]:
    """HF weight name -> GGUF tensor name for every matrix a GGUF file of this architecture holds."""
    return arch.gguf_names(n_layers)


def from_statistics(stats: dict, names: dict[str, str], dataset: str, chunk_size: int,
                    chunk_count: int) -> ImportanceMatrix:
    """An importance matrix from calibration statistics (``quantkit.calibrate.LinearStats`` per HF name)."""
    entries = {names[hf]: ImatrixEntry(s.sum_squares.float().cpu().numpy(), s.tokens) for hf, s in stats.items()}
    return ImportanceMatrix(entries, [dataset], chunk_count, chunk_size)


def importance_for(imatrix: ImportanceMatrix, gguf_name: str, columns: int, origin: str) -> torch.Tensor | None:
    """The importance of one weight's input columns; fails if the file holds it with another width."""
    values = imatrix.values(gguf_name)
    if values is None:
        return None
    if values.shape != (columns,):
        raise QuantkitError(f"imatrix {origin} has {values.size} columns for {gguf_name}, the model has {columns}; "
                            "use an imatrix made for this model")
    if not np.isfinite(values).all():
        raise QuantkitError(f"imatrix {origin} holds non-finite values for {gguf_name}; recompute it")
    return torch.from_numpy(values)


def check_covers(imatrix: ImportanceMatrix, gguf_names: list[str], origin: str) -> None:
    """Fail before any work when the file lacks one of the block linears the run will quantize.

    ``output.weight`` may be missing (llama-imatrix skips it unless asked): it is then quantized
    without importance, as llama-quantize does.
    """
    missing = [n for n in gguf_names if n not in imatrix.entries and n != "output.weight"]
    if missing:
        raise QuantkitError(f"imatrix {origin} has no entry for {missing[0]} ({len(missing)} missing); "
                            "use an imatrix made for this model, or --imatrix calib to collect one")


def load_imatrix_option(option: str, source: ModelSource, names: list[str]) -> ImportanceMatrix | None:
    """The imatrix file ``--imatrix PATH`` names, read and checked against the weights the run quantizes
    (None for ``none`` and ``calib``: nothing to read)."""
    if option != "none" and source.arch.experts:
        raise QuantkitError(f"--imatrix {option}: importance matrices for mixture-of-experts models "
                            f"({source.arch.name}) are not supported yet; drop --imatrix or use --method gptq")
    if option in ("none", "calib"):
        return None
    imatrix = read_imatrix(option)
    to_gguf = gguf_weight_names(source.arch, source.n_layers)
    linears = [n for n in names if n != source.arch.embedding]  # token_embd is a lookup: no importance
    check_covers(imatrix, [to_gguf[n] for n in linears], option)
    for name in linears:
        importance_for(imatrix, to_gguf[name], source.tensors[name].shape[1], option)
    return imatrix


# ---- files -----------------------------------------------------------------------------------------


def read_imatrix(path: str | Path) -> ImportanceMatrix:
    """Read a llama.cpp imatrix file, GGUF or legacy .dat (told apart by the GGUF magic, as llama.cpp does)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise QuantkitError(f"cannot read imatrix file {path} ({exc.strerror}); pass an existing file") from None
    reader = _read_gguf if magic == b"GGUF" else _read_legacy
    try:
        return reader(path)
    except (ValueError, struct.error, IndexError, UnicodeDecodeError) as exc:
        raise QuantkitError(f"{path} is not a llama.cpp imatrix file ({exc}); pass an imatrix .gguf or .dat") from None


def _read_gguf(path: Path) -> ImportanceMatrix:
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    entries = {}
    for name, t in tensors.items():
        if not name.endswith(SUM_SUFFIX):
            continue
        base = name.removesuffix(SUM_SUFFIX)
        counts = tensors.get(base + COUNT_SUFFIX)
        if counts is None:
            raise ValueError(f"{name} has no {base + COUNT_SUFFIX}")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or counts.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ValueError(f"sums and counts of {base} must be F32")
        count = np.asarray(counts.data, dtype=np.float32).reshape(-1)
        if count.size != 1:  # one count per expert: 3-D (mixture-of-experts) weights
            raise ValueError(f"{base} has {count.size} experts; quantkit handles dense models only")
        entries[base] = ImatrixEntry(np.array(t.data, dtype=np.float32).reshape(-1), round(float(count[0])))
    if not entries:
        raise ValueError("no <name>.in_sum2 tensors")
    return ImportanceMatrix(entries, _gguf_strings(reader, gguf.Keys.IMatrix.DATASETS),
                            _gguf_int(reader, gguf.Keys.IMatrix.CHUNK_COUNT),
                            _gguf_int(reader, gguf.Keys.IMatrix.CHUNK_SIZE))


def _gguf_int(reader: gguf.GGUFReader, key: str) -> int:
    f = reader.get_field(key)
    return 0 if f is None else int(f.parts[f.data[0]][0])


def _gguf_strings(reader: gguf.GGUFReader, key: str) -> list[str]:
    f = reader.get_field(key)
    return [] if f is None else [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def _read_legacy(path: Path) -> ImportanceMatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ValueError("no entries")
    entries = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        name = data[pos:pos + length].decode("utf-8")
        pos += length
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise ValueError(f"entry {name} is truncated")
        entries[name] = ImatrixEntry(np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32),
                                     ncall)
        pos += 4 * nval
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):  # the trailing chunk count and dataset name are optional
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0:
                datasets.append(data[pos:pos + length].decode("utf-8"))
    return ImportanceMatrix(entries, datasets, chunk_count, 0, legacy=True)


def write_imatrix(imatrix: ImportanceMatrix, path: str | Path) -> Path:
    """Write ``imatrix`` as llama.cpp's legacy binary when ``path`` ends in .dat, else as GGUF."""
    path = Path(path)
    (_write_legacy if path.suffix == ".dat" else _write_gguf)(imatrix, path)
    return path


def _write_gguf(imatrix: ImportanceMatrix, path: Path) -> None:
    writer = gguf.GGUFWriter(str(path), arch="")
    # llama-imatrix writes no general.architecture; GGUFWriter adds one on creation
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, imatrix.datasets)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, imatrix.chunk_count)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, imatrix.chunk_size)
    for name in sorted(imatrix.entries):  # llama-imatrix sorts names too
        entry = imatrix.entries[name]
        # numpy shapes are ggml's ne reversed: (1, n_in) is ne = [n_in, 1]
        writer.add_tensor(name + SUM_SUFFIX, entry.sums.astype(np.float32).reshape(1, -1))
        writer.add_tensor(name + COUNT_SUFFIX, np.full((1, 1), entry.count, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_legacy(imatrix: ImportanceMatrix, path: Path) -> None:
    chunk = max(imatrix.chunk_size, 1)
    # llama-imatrix leaves out entries without data in this format (GGUF keeps them with count 0)
    names = sorted(n for n, e in imatrix.entries.items() if imatrix.legacy or e.count > 0)
    parts = [struct.pack("<i", len(names))]
    for name in names:
        entry = imatrix.entries[name]
        if imatrix.legacy:
            ncall, values = entry.count, entry.sums
        else:  # llama-imatrix stores mean * ncall with ncall = ceil(tokens / chunk size)
            ncall = math.ceil(entry.count / chunk)
            values = (entry.sums / np.float32(entry.count)) * np.float32(ncall)
        encoded = name.encode("utf-8")
        parts += [struct.pack("<i", len(encoded)), encoded, struct.pack("<ii", ncall, values.size),
                  values.astype("<f4").tobytes()]
    dataset = (imatrix.datasets[-1] if imatrix.datasets else "").encode("utf-8")
    parts += [struct.pack("<i", imatrix.chunk_count), struct.pack("<i", len(dataset)), dataset]
    path.write_bytes(b"".join(parts))
