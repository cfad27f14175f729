"""W8A8: dynamic per-token int8 activation quantization, and an int8 x int8 -> int32 GEMM with
per-token activation scales and per-channel weight scales. Each beside its torch reference.

Rounding is half away from zero in both kernel and reference, so they agree exactly on the codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

QMAX = 127


def round_half_away(y: torch.Tensor) -> torch.Tensor:
    return torch.sign(y) * torch.floor(y.abs() + 0.5)


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 scale per row): scale = max|row| / 127, codes = round(x / scale)."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return round_half_away(x / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8), scale


def w8a8_matmul_reference(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                          out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """(xq @ wq.T) accumulated exactly, scaled by x_scale[m] * w_scale[n]."""
    acc = xq.double() @ wq.double().T  # exact: |sum| <= K * 127^2 is far below 2^53
    return (acc.float() * x_scale.float()[:, None] * w_scale.float()[None, :]).to(out_dtype)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, BLOCK_K: tl.constexpr):
    """One program per row; the row is read twice (max, then codes) in BLOCK_K chunks."""
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.max(amax, axis=0) / 127.0
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        y = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32) / scale
        q = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(-y + 0.5))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.int8), mask=offs < K)


@triton.jit
def _w8a8_kernel(xq_ptr, x_scale_ptr, wq_ptr, w_scale_ptr, out_ptr, M, N, K,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(xq_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        w = tl.load(wq_ptr + offs_n[None, :] * K + offs_k[:, None],
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0)
        acc += tl.dot(x, w, out_dtype=tl.int32)
    xs = tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_per_token(x: torch.Tensor, block_k: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of quantize_per_token_reference for a (M, K) activation."""
    if x.ndim != 2:
        raise ValueError(f"expected a (tokens, features) activation, got shape {tuple(x.shape)}")
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), BLOCK_K=block_k)
    return q, scale


def w8a8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.float16, block_m: int = 32, block_n: int = 64,
                block_k: int = 64) -> torch.Tensor:
    """Triton version of w8a8_matmul_reference: xq (M, K) int8, wq (N, K) int8."""
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise TypeError("xq and wq must be int8")
    if xq.shape[1] != wq.shape[1] or x_scale.shape != (xq.shape[0],) or w_scale.shape != (wq.shape[0],):
        raise ValueError("shapes do not fit: xq (M, K), x_scale (M,), wq (N, K), w_scale (N,)")
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a8_kernel[grid](xq.contiguous(), x_scale.float().contiguous(), wq.contiguous(), w_scale.float().contiguous(),
                       out, m, n, k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
