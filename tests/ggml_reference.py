"""ggml's own quantizer, called through ctypes: the byte-exact reference for quantkit's GGUF grids.

llama-cpp-python ships ggml's shared libraries; ``ggml_quantize_chunk`` is the function llama.cpp's
quantizer calls per chunk of rows, with or without an importance matrix. Test and benchmark code only.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import gguf
import numpy as np


@cache
def _library() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(type_name: str, weight: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows of ``weight`` (float32, ``(rows, n_per_row)``) quantized by ggml to ``type_name``, optionally
    weighted by ``imatrix`` (``(n_per_row,)`` float32, one importance per input column). Returns
    ``(rows, row_bytes)`` uint8."""
    ggml_type = gguf.GGMLQuantizationType[type_name]
    src = np.ascontiguousarray(weight, dtype=np.float32)
    rows, n_per_row = src.shape
    block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    dst = np.zeros((rows, n_per_row // block * type_size), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if qw is not None and qw.shape != (n_per_row,):
        raise ValueError(f"imatrix has shape {qw.shape}, expected ({n_per_row},)")
    lib = _library()
    lib.ggml_quantize_init(int(ggml_type))
    written = lib.ggml_quantize_chunk(int(ggml_type), src.ctypes.data, dst.ctypes.data, 0, rows, n_per_row,
                                      None if qw is None else qw.ctypes.data)
    assert written == dst.nbytes, (written, dst.nbytes)
    return dst


def ggml_dequantize(type_name: str, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    """ggml's own decode (``dequantize_row_*``, what llama.cpp runs to turn blocks into floats) of rows of
    raw blocks ``(rows, row_bytes)`` uint8; returns ``(rows, n_per_row)`` float32."""
    fn = getattr(_library(), f"dequantize_row_q{type_name[1:]}")  # Q4_K -> dequantize_row_q4_K
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    src = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.zeros((src.shape[0], n_per_row), dtype=np.float32)
    fn(src.ctypes.data, out.ctypes.data, out.size)
    return out
