"""Plain-torch references for the Triton kernels, with the same signatures.

Layouts (see quantkit.packing): ``gptq`` = GPTQ v1 (qweight packed along the input dim, zeros stored
minus one, ``g_idx`` per input channel); ``awq`` = AWQ GEMM (qweight packed along the output dim in
AWQ's nibble order, zeros as they are, groups of ``group_size`` consecutive inputs). 4-bit codes.
"""

from __future__ import annotations

import torch

from quantkit.packing import awq_dequantize, gptq_dequantize

LAYOUTS = ("gptq", "awq")


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
               layout: str, group_size: int, out_dtype: torch.dtype = torch.float16, bits: int = 4) -> torch.Tensor:
    """The ``(out_features, in_features)`` weight of a packed linear (GPTQ: 2/4/8 bit, AWQ: 4 bit)."""
    if layout == "gptq":
        if g_idx is None:
            in_features = qweight.shape[0] * 32 // bits
            g_idx = torch.arange(in_features, device=qweight.device) // group_size
        w = gptq_dequantize(qweight, qzeros, scales, g_idx, bits)
    elif layout == "awq":
        if bits != 4:
            raise ValueError("the AWQ layout holds 4-bit codes only")
        w = awq_dequantize(qweight, qzeros, scales, group_size)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return w.to(out_dtype)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None, layout: str, group_size: int, bits: int = 4) -> torch.Tensor:
    """``x @ W.T`` for a packed weight; computed in fp32, returned in ``x``'s dtype."""
    w = dequantize(qweight, qzeros, scales, g_idx, layout, group_size, torch.float32, bits)
    return (x.float() @ w.T).to(x.dtype)
