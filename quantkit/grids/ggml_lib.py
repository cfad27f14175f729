"""ggml's own quantizer, called through ctypes: GGUF quantization at C speed.

llama-cpp-python installs llama.cpp's shared libraries inside its package; ``ggml_quantize_chunk``
there is the function llama.cpp's quantizer calls for each chunk of rows, with or without an
importance matrix. Rows are independent, so quantkit splits a tensor's rows over threads (ctypes
releases the GIL during the call) and gets the bytes llama-quantize writes.

The torch grids in ``quantkit.grids`` remain the tested reference (they reproduce ggml's searches
step for step) and the engine wherever no C library is installed. ``QUANTKIT_GGUF_ENGINE=torch``
forces them; ``use_engine("torch")`` does the same inside a ``with`` block.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import gguf
import numpy as np

ENGINES = ("auto", "ggml", "torch")
_engine = os.environ.get("QUANTKIT_GGUF_ENGINE", "auto")
# Rows handed to one ggml call: enough work per call that thread hand-off costs nothing measurable.
MIN_WEIGHTS_PER_CALL = 1 << 16


@cache
def _library() -> ctypes.CDLL | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not path.is_file():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def engine() -> str:
    """The engine GGUF quantization runs on now: "ggml" (llama.cpp's C library) or "torch"."""
    if _engine not in ENGINES:
        raise ValueError(f"QUANTKIT_GGUF_ENGINE={_engine!r}; use one of {', '.join(ENGINES)}")
    if _engine == "torch":
        return "torch"
    if _library() is None:
        if _engine == "ggml":
            raise RuntimeError("QUANTKIT_GGUF_ENGINE=ggml but llama-cpp-python's libggml-base is not installed")
        return "torch"
    return "ggml"


@contextlib.contextmanager
def use_engine(name: str) -> Iterator[None]:
    """Run GGUF quantization on ``name`` ("auto", "ggml" or "torch") inside the block."""
    global _engine
    if name not in ENGINES:
        raise ValueError(f"engine {name!r}; use one of {', '.join(ENGINES)}")
    previous, _engine = _engine, name
    try:
        yield
    finally:
        _engine = previous


def row_bytes(type_name: str, n_per_row: int) -> int:
    from quantkit.grids.gguf_types import GGUF_TYPES  # the registry imports the grids, which import this

    return GGUF_TYPES[type_name].row_bytes(n_per_row)


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count for the whole process: a run makes thousands of calls."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="quantkit-ggml")


def quantize_rows(type_name: str, rows: np.ndarray, importance: np.ndarray | None = None,
                  threads: int | None = None) -> np.ndarray:
    """Rows of ``rows`` (float32 ``(n_rows, n_per_row)``) quantized by ggml to ``type_name``, weighted by
    ``importance`` (``(n_per_row,)``, one value per input column) when given. Returns ``(n_rows, row_bytes)``
    uint8, the bytes llama.cpp's quantizer writes for these rows."""
    lib = _library()
    if lib is None:
        raise RuntimeError("llama-cpp-python's libggml-base is not installed; pip install 'quantkit[llama]'")
    ggml_type = int(gguf.GGMLQuantizationType[type_name])
    src = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = src.shape
    dst = np.empty((n_rows, row_bytes(type_name, n_per_row)), dtype=np.uint8)
    weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    if weights is not None and weights.shape != (n_per_row,):
        raise ValueError(f"importance has shape {weights.shape}, expected ({n_per_row},)")
    lib.ggml_quantize_init(ggml_type)
    imatrix = None if weights is None else weights.ctypes.data

    def run(start: int, stop: int) -> int:
        return lib.ggml_quantize_chunk(ggml_type, src.ctypes.data, dst.ctypes.data, start * n_per_row,
                                       stop - start, n_per_row, imatrix)

    threads = threads or os.cpu_count() or 1
    per_call = max(1, MIN_WEIGHTS_PER_CALL // max(n_per_row, 1))
    step = max(per_call, -(-n_rows // threads))
    spans = [(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]
    written = run(*spans[0]) if len(spans) == 1 else sum(_pool(threads).map(lambda span: run(*span), spans))
    if written != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {type_name}, expected {dst.nbytes}")
    return dst


def dequantize_rows(type_name: str, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    """ggml's own decode (``dequantize_row_*``, what llama.cpp runs) of rows of raw blocks ``(rows, row_bytes)``;
    returns ``(rows, n_per_row)`` float32."""
    lib = _library()
    if lib is None:
        raise RuntimeError("llama-cpp-python's libggml-base is not installed; pip install 'quantkit[llama]'")
    suffix = type_name.lower() if type_name.startswith("IQ") else f"q{type_name[1:]}"  # Q4_K -> q4_K
    fn = getattr(lib, f"dequantize_row_{suffix}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    src = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.zeros((src.shape[0], n_per_row), dtype=np.float32)
    fn(src.ctypes.data, out.ctypes.data, out.size)
    return out
