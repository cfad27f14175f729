"""ggml's own quantizer and decoder, called through ctypes: the byte-exact reference for quantkit's
torch GGUF grids.

llama-cpp-python ships ggml's shared libraries; ``ggml_quantize_chunk`` is the function llama.cpp's
quantizer calls per chunk of rows, with or without an importance matrix (bound in
``quantkit.grids.ggml_lib``, which the GGUF target uses too); ``dequantize_row_*`` is what llama.cpp
runs to turn blocks into floats.
"""

from __future__ import annotations

import numpy as np

from quantkit.grids import ggml_lib


def ggml_quantize(type_name: str, weight: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows of ``weight`` (float32, ``(rows, n_per_row)``) quantized by ggml to ``type_name``, optionally
    weighted by ``imatrix`` (``(n_per_row,)`` float32, one importance per input column), in one call on one
    thread. Returns ``(rows, row_bytes)`` uint8."""
    return ggml_lib.quantize_rows(type_name, weight, imatrix, threads=1)


def ggml_dequantize(type_name: str, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    """ggml's own decode (``dequantize_row_*``, what llama.cpp runs to turn blocks into floats) of rows of
    raw blocks ``(rows, row_bytes)`` uint8; returns ``(rows, n_per_row)`` float32."""
    return ggml_lib.dequantize_rows(type_name, raw, n_per_row)
