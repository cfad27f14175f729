"""Triton kernels for packed weights (GPTQ v1 layout at 2, 4 or 8 bits; AWQ GEMM at 4 bits): dequantize,
and a weight-only GEMM (W4A16 and friends) that dequantizes inside the K loop, with a split-K variant
for small M (decode).

Each wrapper checks its inputs, allocates the output, and launches. The kernels run on CUDA and
under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors), which is how CI tests them. Block
shapes are valid on a GPU (``tl.dot`` blocks are at least 16 in every dimension). bf16 activations
are upcast to fp32 before ``tl.dot``: the interpreter multiplies bf16 operands wrongly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantkit.kernels.reference import LAYOUTS

GPTQ, AWQ = 0, 1


@triton.jit
def _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, K, N, group_size,
                  LAYOUT: tl.constexpr, BITS: tl.constexpr):
    """A (BLOCK_K, BLOCK_N) fp32 tile of W^T (input rows, output columns)."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    if LAYOUT == 0:  # GPTQ: word [k // f, n], slot k % f (f = 32 / BITS); zeros along n, stored minus one
        per_word: tl.constexpr = 32 // BITS
        code_mask: tl.constexpr = (1 << BITS) - 1
        packed = tl.load(qweight_ptr + (offs_k[:, None] // per_word) * N + offs_n[None, :], mask=mask, other=0)
        q = (packed >> ((offs_k[:, None] % per_word) * BITS)) & code_mask
        g = tl.load(g_idx_ptr + offs_k, mask=offs_k < K, other=0)
        zword = tl.load(qzeros_ptr + g[:, None] * (N // per_word) + offs_n[None, :] // per_word, mask=mask, other=0)
        z = ((zword >> ((offs_n[None, :] % per_word) * BITS)) & code_mask) + 1
    else:  # AWQ: word [k, n // 8], column c = n % 8 sits in nibble (c % 2) * 4 + c // 2
        slot = (offs_n[None, :] % 8 % 2) * 4 + (offs_n[None, :] % 8) // 2
        packed = tl.load(qweight_ptr + offs_k[:, None] * (N // 8) + offs_n[None, :] // 8, mask=mask, other=0)
        q = (packed >> (slot * 4)) & 0xF
        g = offs_k // group_size
        zword = tl.load(qzeros_ptr + g[:, None] * (N // 8) + offs_n[None, :] // 8, mask=mask, other=0)
        z = (zword >> (slot * 4)) & 0xF
    s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return (q - z).to(tl.float32) * s


@triton.jit
def _dequant_kernel(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, K, N, group_size,
                    LAYOUT: tl.constexpr, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, K, N, group_size, LAYOUT,
                      BITS)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    # the output is the torch weight layout (N, K): element [n, k]
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, M, N, K, group_size,
                 stride_xm, stride_om, k_per_split,
                 LAYOUT: tl.constexpr, BITS: tl.constexpr, UPCAST: tl.constexpr, SPLIT_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M, N] (+)= x[M, K] @ W^T[K, N]; with SPLIT_K > 1 each program sums one K range atomically."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, K, N, group_size, LAYOUT,
                          BITS)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1


# Per backend: the interpreter wants few, large program instances; a GPU wants occupancy. Decode
# shapes (M <= 16) split K so that enough programs run when M gives only one row block.
CUDA_CONFIGS = {"decode": GemmConfig(16, 64, 128, split_k=4), "small": GemmConfig(32, 64, 64),
                "large": GemmConfig(64, 128, 64)}
INTERPRETER_CONFIGS = {"decode": GemmConfig(16, 64, 64, split_k=2), "small": GemmConfig(32, 64, 64),
                       "large": GemmConfig(64, 64, 64)}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_config(m: int, split_k: int | None = None, table: dict[str, GemmConfig] | None = None) -> GemmConfig:
    table = table or (INTERPRETER_CONFIGS if interpreting() else CUDA_CONFIGS)
    config = table["decode"] if m <= 16 else table["small"] if m <= 64 else table["large"]
    if split_k is not None:
        config = GemmConfig(config.block_m, config.block_n, config.block_k, split_k)
    return config


def launch_plan(m: int, n: int, k: int, config: GemmConfig) -> tuple[int, tuple[int, int, int]]:
    """K columns per split (a multiple of BLOCK_K) and the (M, N, K-split) launch grid."""
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    return k_per_split, (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), triton.cdiv(k, k_per_split))


def _check(qweight, qzeros, scales, g_idx, layout: str, group_size: int, bits: int) -> tuple[int, int, int]:
    """(K, N, layout id) after checking shapes and dtypes of a packed weight."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if bits not in ((2, 4, 8) if layout == "gptq" else (4,)):
        raise ValueError(f"{layout} layout cannot hold {bits}-bit codes")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError("qweight and qzeros must be int32")
    per_word = 32 // bits
    if layout == "gptq":
        k, n = qweight.shape[0] * per_word, qweight.shape[1]
        if g_idx is None or g_idx.shape != (k,):
            raise ValueError(f"gptq layout needs g_idx of shape ({k},)")
    else:
        k, n = qweight.shape[0], qweight.shape[1] * per_word
    if scales.shape[1] != n or qzeros.shape[1] * per_word != n or n % per_word:
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not fit N={n}")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group size {group_size} must divide K={k}")
    return k, n, GPTQ if layout == "gptq" else AWQ


def _g_idx_or_dummy(g_idx: torch.Tensor | None, qweight: torch.Tensor) -> torch.Tensor:
    return g_idx.to(torch.int32) if g_idx is not None else torch.zeros(1, dtype=torch.int32, device=qweight.device)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
               layout: str, group_size: int, out_dtype: torch.dtype = torch.float16, bits: int = 4) -> torch.Tensor:
    """Triton version of quantkit.kernels.reference.dequantize: the (N, K) weight."""
    k, n, layout_id = _check(qweight, qzeros, scales, g_idx, layout, group_size, bits)
    out = torch.empty(n, k, dtype=out_dtype, device=qweight.device)
    block_k, block_n = 64, 64
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](qweight, qzeros, scales, _g_idx_or_dummy(g_idx, qweight), out, k, n, group_size,
                          LAYOUT=layout_id, BITS=bits, BLOCK_K=block_k, BLOCK_N=block_n)
    return out


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None, layout: str, group_size: int,
                 config: GemmConfig | None = None, bits: int = 4) -> torch.Tensor:
    """``x @ W.T`` with W dequantized tile by tile inside the K loop; x is (..., K), fp16/bf16/fp32."""
    k, n, layout_id = _check(qweight, qzeros, scales, g_idx, layout, group_size, bits)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    config = config or pick_config(m)
    k_per_split, grid = launch_plan(m, n, k, config)
    split_k = grid[2]
    out = torch.zeros(m, n, dtype=torch.float32 if split_k > 1 else x.dtype, device=x.device)
    _gemm_kernel[grid](x2, qweight, qzeros, scales, _g_idx_or_dummy(g_idx, qweight), out, m, n, k, group_size,
                       x2.stride(0), out.stride(0), k_per_split,
                       LAYOUT=layout_id, BITS=bits, UPCAST=x.dtype != torch.float16, SPLIT_K=split_k,
                       BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
