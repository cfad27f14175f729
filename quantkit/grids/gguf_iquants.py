"""GGUF's non-linear 4-bit types: IQ4_NL and IQ4_XS.

A 4-bit code indexes a fixed table of 16 signed values (ggml's ``kvalues_iq4nl``), denser near zero where
most weights are, times a scale per 32 weights. IQ4_NL (18 bytes per 32 weights, 4.5 bits): an fp16 scale
and 16 bytes of codes per block. IQ4_XS (136 bytes per 256 weights, 4.25 bits): one fp16 super-block
scale ``d``, a 6-bit integer ``ls`` per 32-weight sub-block (low 4 bits in ``scales_l``, high 2 in
``scales_h``), sub-block scale ``d * (ls - 32)``, then the codes.

ggml searches the scales (15 trial scales per block, weighted by the importance matrix or by ``x^2``).
``reference_fit`` is that search step for step in torch (the tested reference, byte-identical to ggml);
runs use ggml's own C library where it is installed (``ggml_lib``) and read its scales and codes back.
GPTQ rounds each column to the nearest table value on the fitted scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quantkit.grids.base import QuantizedWeight, QuantParams
from quantkit.grids.ggml_search import (
    GROUP_MAX_EPS,
    imatrix_weights,
    nearest_int,
    rdiv,
    sequential_sum,
    signed_absmax,
)
from quantkit.grids.gguf_legacy import (
    GGUFBlockGrid,
    _fp16_round,
    _halves,
    assemble_blocks,
    read_f16,
    read_halves,
)

# ggml's kvalues_iq4nl
TABLE = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
SUB_BLOCK = 32


def _table() -> torch.Tensor:
    return torch.tensor(TABLE, dtype=torch.float32)


def nearest_codes(x: torch.Tensor) -> torch.Tensor:
    """The index of the table value nearest to each of ``x`` (already divided by the scale)."""
    return (x[..., None] - _table()).abs().argmin(dim=-1).to(torch.int32)


@dataclass(frozen=True)
class _NonLinear4(GGUFBlockGrid):
    uses_importance: bool = True
    bits: int = 4

    def costly_search(self, importance: torch.Tensor | None) -> bool:
        return True  # 16 trial scales per block: C beats torch by orders of magnitude

    def reference_fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        """ggml's search step for step (``quantize_row_iq4_nl_impl``): per 32 weights a first scale from the
        signed absmax, then 15 trial scales, each refit by weighted least squares; IQ4_XS then puts the
        sub-block scales on a 6-bit grid of one fp16 super-block scale and re-picks the codes."""
        x = w.float()
        if importance is not None:
            sigma2 = sequential_sum(x * x) * (2.0 / x.shape[-1])
            weights = imatrix_weights(x, importance.float().expand_as(x), sigma2[..., None])
        else:
            weights = x * x
        subs = x.shape[-1] // SUB_BLOCK
        xs = x.reshape(*x.shape[:-1], subs, SUB_BLOCK)
        scales = _block_scales(xs, weights.reshape(xs.shape))
        return self._finish(xs, scales)

    def _scale_per_weight(self, params: QuantParams, shape: torch.Size) -> torch.Tensor:
        per_sub = params.scale.shape[-1]
        return params.scale[..., None].expand(*params.scale.shape, shape[-1] // per_sub).reshape(shape)

    def encode(self, w: torch.Tensor, params: QuantParams) -> torch.Tensor:
        if params.aux:  # ggml's codes for the weights it was given
            return params.aux[-1].to(torch.int32)
        scale = self._scale_per_weight(params, w.shape)
        return torch.where(scale == 0, 0, nearest_codes(w / torch.where(scale == 0, 1.0, scale)))

    def decode(self, codes: torch.Tensor, params: QuantParams) -> torch.Tensor:
        return _table()[codes.long()] * self._scale_per_weight(params, codes.shape)


def best_index(x: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8 on the table: the nearest value, the upper one on ties, ends clamped."""
    table = _table()
    upper = torch.searchsorted(table, x.contiguous(), right=True).clamp(1, len(TABLE) - 1)
    lo, hi = table[upper - 1], table[upper]
    index = torch.where(x - lo < hi - x, upper - 1, upper)
    return torch.where(x <= table[0], 0, torch.where(x >= table[-1], len(TABLE) - 1, index))


def _fit_sums(x: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(w q x) and sum(w q q) over each block for codes picked at ``inverse`` (one per block)."""
    q = _table()[best_index(inverse[..., None] * x)]
    wq = weights * q
    return sequential_sum(wq * x), sequential_sum(wq * q)


def _block_scales(x: torch.Tensor, weights: torch.Tensor, ntry: int = 7) -> torch.Tensor:
    """The scale ggml settles on for each 32-weight block of ``x`` ``(..., blocks, 32)``; 0 for empty blocks."""
    first = TABLE[0]
    peak = signed_absmax(x)
    empty = x.abs().amax(-1) < GROUP_MAX_EPS
    peak = torch.where(empty, torch.ones_like(peak), peak)
    d = -peak / torch.full_like(peak, first)  # one IEEE division, as C's (a scalar divisor may become a product)
    sumqx, sumq2 = _fit_sums(x, weights, rdiv(1.0, d))
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2)), torch.zeros_like(d))
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = _fit_sums(x, weights, rdiv(float(itry + first), peak))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2)), d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(empty, torch.zeros_like(d), d)


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, rdiv(1.0, torch.where(d != 0, d, torch.ones_like(d))), torch.zeros_like(d))


@dataclass(frozen=True)
class IQ4_NL(_NonLinear4):
    name: str = "IQ4_NL"
    block_bytes: int = 18

    def _finish(self, x: torch.Tensor, scales: torch.Tensor) -> QuantParams:
        codes = best_index(_safe_inverse(scales)[..., None] * x)  # on the fp32 scale, as ggml
        return QuantParams(scale=_fp16_round(scales), aux=(codes.reshape(*x.shape[:-2], -1).float(),))

    def params_from_blocks(self, raw: np.ndarray) -> QuantParams:
        d = read_f16(raw, 0)
        return QuantParams(scale=d, aux=(torch.from_numpy(read_halves(raw[..., 2:18]).astype(np.float32)),))

    def column_params(self, params: QuantParams, offset: int) -> QuantParams:
        return QuantParams(scale=params.scale)

    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes()
        d = qw.params.scale.squeeze(-1).numpy().astype("<f2")
        return assemble_blocks([d, _halves(codes)], codes.shape[0])


@dataclass(frozen=True)
class IQ4_XS(_NonLinear4):
    name: str = "IQ4_XS"
    group_size: int = 256
    block_bytes: int = 136
    column_encodable: bool = False

    def params_from_blocks(self, raw: np.ndarray) -> QuantParams:
        d = read_f16(raw, 0)
        high = np.ascontiguousarray(raw[..., 2:4]).view("<u2").astype(np.int64)  # (..., 1)
        low = raw[..., 4:8].astype(np.int64)
        subs = np.arange(8)
        ls = ((low[..., subs // 2] >> (4 * (subs % 2))) & 0xF) | (((high >> (2 * subs)) & 3) << 4)
        ls_t = torch.from_numpy(ls.astype(np.float32))
        codes = np.concatenate([read_halves(raw[..., 8 + 16 * s : 24 + 16 * s]) for s in range(8)], axis=-1)
        return QuantParams(scale=d * (ls_t - 32), aux=(d, ls_t, torch.from_numpy(codes.astype(np.float32))))

    def column_params(self, params: QuantParams, offset: int) -> QuantParams:
        s = offset // SUB_BLOCK
        return QuantParams(scale=params.scale[..., s : s + 1])

    def _finish(self, x: torch.Tensor, scales: torch.Tensor) -> QuantParams:
        """Sub-block scales on a 6-bit grid of the super-block scale ``d = -max_scale / 32``."""
        biggest = torch.gather(scales, -1, scales.abs().argmax(-1, keepdim=True))  # the first on ties
        d = -biggest / 32
        levels = nearest_int(_safe_inverse(d) * scales).clamp(-32, 31)
        codes = best_index(_safe_inverse(d * levels)[..., None] * x)  # on the fp32 d, as ggml
        d16 = _fp16_round(d)
        ls = levels + 32
        return QuantParams(scale=d16 * (ls - 32), aux=(d16, ls, codes.reshape(*x.shape[:-2], -1).float()))

    def with_codes(self, params: QuantParams, codes: torch.Tensor) -> QuantParams:
        return QuantParams(params.scale, aux=(*params.aux[:-1], codes.to(params.aux[-1].dtype)))

    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        d, ls, _ = qw.params.aux
        codes = qw.grouped_codes()
        ls_int = ls.numpy().astype(np.uint32)  # (rows, blocks, 8)
        subs = np.arange(8, dtype=np.uint32)
        high = np.bitwise_or.reduce(((ls_int >> 4) & 3) << (2 * subs), axis=-1).astype("<u2")[..., None]
        low = ((ls_int[..., 0::2] & 0xF) | ((ls_int[..., 1::2] & 0xF) << 4)).astype(np.uint8)
        quads = codes.reshape(*codes.shape[:-1], 8, SUB_BLOCK)
        packed = _halves(quads).reshape(*codes.shape[:-1], 128)
        return assemble_blocks([d.squeeze(-1).numpy().astype("<f2"), high, low, packed], codes.shape[0])
