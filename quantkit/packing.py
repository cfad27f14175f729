"""Packed integer layouts of the Hugging Face GPTQ (v1) and AWQ (GEMM) checkpoint formats.

GPTQ v1, for a linear with ``in`` inputs and ``out`` outputs, ``b`` bits (32 % b == 0), ``f = 32 // b``:
  qweight int32 (in / f, out)   codes packed along the input dim: word [i, o] holds q[f*i + k, o] at bit b*k
  qzeros  int32 (groups, out / f) zero points packed along the output dim, stored as zero - 1
  scales  fp16  (groups, out)
  g_idx   int32 (in,)           group of each input channel
  weight[o, i] = scales[g_idx[i], o] * (q[i, o] - (stored_zero[g_idx[i], o] + 1))
AWQ GEMM (4 bit only):
  qweight int32 (in, out / 8)   codes packed along the output dim, nibble k holds output 8j + AWQ_ORDER[k]
  qzeros  int32 (groups, out / 8) same packing, zeros stored as they are
  scales  fp16  (groups, out)
"""

from __future__ import annotations

import re

import torch

from quantkit.errors import QuantkitError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column AWQ_ORDER[k] of its 8


def _check_bits(bits: int) -> int:
    if 32 % bits:
        raise ValueError(f"{bits}-bit codes do not pack evenly into int32 words; use 2, 4 or 8 bits")
    return 32 // bits


def pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, m) unsigned codes -> (n / f, m) int32; row f*i + k goes to bits [b*k, b*k + b) of word row i."""
    per_word = _check_bits(bits)
    n, m = values.shape
    v = values.to(torch.int64).reshape(n // per_word, per_word, m)
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(1, per_word, 1)
    return _to_int32((v << shifts).sum(dim=1))


def unpack_along_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = _check_bits(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(1, per_word, 1)
    values = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(-1, words.shape[1]).to(torch.int32)


def pack_along_columns(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """(n, m) unsigned codes -> (n, m / f) int32; word j's slot k holds column f*j + order[k]."""
    per_word = _check_bits(bits)
    n, m = values.shape
    v = values.to(torch.int64).reshape(n, m // per_word, per_word)
    if order is not None:
        v = v[..., list(order)]
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(1, 1, per_word)
    return _to_int32((v << shifts).sum(dim=2))


def unpack_along_columns(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    per_word = _check_bits(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(1, 1, per_word)
    slots = (w.unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    if order is not None:
        slots = slots[..., list(torch.argsort(torch.tensor(order)))]
    return slots.reshape(words.shape[0], -1).to(torch.int32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """Plain-torch reference: the (out, in) float32 weight a GPTQ v1 checkpoint stores."""
    q = unpack_along_rows(qweight, bits).float()  # (in, out)
    zeros = unpack_along_columns(qzeros, bits).float() + 1  # (groups, out)
    g = g_idx.long()
    return ((q - zeros[g]) * scales.float()[g]).T.contiguous()


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Plain-torch reference: the (out, in) float32 weight an AWQ GEMM checkpoint stores."""
    q = unpack_along_columns(qweight, 4, AWQ_ORDER).float()  # (in, out)
    zeros = unpack_along_columns(qzeros, 4, AWQ_ORDER).float()  # (groups, out)
    g = torch.arange(q.shape[0]) // group_size
    return ((q - zeros[g]) * scales.float()[g]).T.contiguous()


def module_layout(quantization_config: dict, module: str) -> tuple[int, int]:
    """(bits, group size) of ``module`` in a GPTQ config: the first ``dynamic`` rule that matches it overrides the
    config's ``bits`` / ``group_size``."""
    bits, group_size = int(quantization_config["bits"]), int(quantization_config["group_size"])
    for pattern, override in (quantization_config.get("dynamic") or {}).items():
        sign, _, regex = pattern.rpartition(":")
        if re.match(regex, module):
            if sign == "-":
                raise QuantkitError(f"{module} is excluded from quantization by a negative dynamic rule, yet "
                                    "stored quantized")
            return int(override.get("bits", bits)), int(override.get("group_size", group_size))
    return bits, group_size
