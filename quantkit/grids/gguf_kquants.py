"""GGUF k-quants as grids: 256-weight super-blocks with sub-block scales (Q6_K so far).

Round-to-nearest on these grids follows ggml's reference quantizer step for step (its scale search,
rounding, and element-by-element fp32 sums), so without an importance matrix the bytes equal
llama.cpp's own quantizer output (tested).

Q6_K block (210 bytes): ql[128] low 4 bits, qh[64] high 2 bits, scales int8[16], d f16. Weight j of
sub-block s decodes as d * scales[s] * (q - 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quantkit.grids.base import QuantizedWeight, QuantParams
from quantkit.grids.gguf_legacy import GGUFBlockGrid, _fp16_round, assemble_blocks

SUPER_BLOCK = 256
GROUP_MAX_EPS = 1e-15


def rdiv(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` as one IEEE fp32 division (torch computes ``scalar / tensor`` as
    ``reciprocal * scalar``, which rounds twice and breaks bit-exactness with ggml)."""
    return torch.full_like(denominator, numerator) / denominator


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even in fp32 (valid for |x| < 2^22)."""
    return torch.round(x)


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's symmetric scale search with x^2 weights, vectorized over leading dims of x (..., n).

    Returns (scale (...), L (...,n) in [0, 2*nmax)): x ~ scale * (L - nmax).
    """
    amax = x.abs().amax(-1)
    signed_max = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))[..., 0]
    safe_max = torch.where(amax < GROUP_MAX_EPS, torch.ones_like(signed_max), signed_max)
    def trial(iscale: torch.Tensor):
        levels = nearest_int(iscale[..., None] * x).clamp(-nmax, nmax - 1)
        # ggml sums element by element in fp32; the same order gives the same ties (and bytes)
        sumlx = torch.zeros(x.shape[:-1], dtype=torch.float32)
        suml2 = torch.zeros(x.shape[:-1], dtype=torch.float32)
        for i in range(x.shape[-1]):
            xi, li = x[..., i], levels[..., i]
            weight = xi * xi
            sumlx = sumlx + weight * xi * li
            suml2 = suml2 + weight * li * li
        return levels, sumlx, suml2

    levels, sumlx, suml2 = trial(rdiv(-nmax, safe_max))
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s != 0]:
        cand, sumlx, suml2 = trial(rdiv(-(nmax + np.float32(0.1) * step), safe_max))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = torch.where(better[..., None], cand, levels)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1.0), scale)
        best = torch.where(better, scale * sumlx, best)
    empty = amax < GROUP_MAX_EPS
    levels = torch.where(empty[..., None], torch.zeros_like(levels), levels)
    scale = torch.where(empty, torch.zeros_like(scale), scale)
    return scale, levels + nmax


@dataclass(frozen=True)
class _KQuant(GGUFBlockGrid):
    """A 256-weight super-block type: ggml picks codes and two levels of scales together in ``fit``
    (the codes ride in the last ``aux`` tensor), so ``encode`` returns them and GPTQ cannot round
    column by column."""

    group_size: int = SUPER_BLOCK
    column_encodable: bool = False
    sub_blocks: int = 16

    def encode(self, w: torch.Tensor, params: QuantParams) -> torch.Tensor:
        return params.aux[-1].to(torch.int32)

    def decode(self, codes: torch.Tensor, params: QuantParams) -> torch.Tensor:
        out = codes.float().reshape(*codes.shape[:-1], self.sub_blocks, -1) * params.scale[..., None]
        if params.minimum is not None:
            out = out + params.minimum[..., None]
        return out.reshape(codes.shape)


@dataclass(frozen=True)
class Q6_K(_KQuant):
    name: str = "Q6_K"
    bits: int = 6
    block_bytes: int = 210

    def fit(self, w: torch.Tensor) -> QuantParams:
        sub = w.float().reshape(*w.shape[:-1], 16, 16)
        sub_scales, levels = make_qx_quants(sub, 32)  # (..., 16), (..., 16, 16)
        max_abs = sub_scales.abs().amax(-1)
        max_scale = torch.gather(sub_scales, -1, sub_scales.abs().argmax(-1, keepdim=True))[..., 0]
        empty = max_abs < GROUP_MAX_EPS
        iscale = rdiv(-128.0, torch.where(empty, torch.ones_like(max_scale), max_scale))
        d = torch.where(empty, 0.0, _fp16_round(rdiv(1.0, iscale)))
        sc = torch.where(empty[..., None], 0.0, nearest_int(iscale[..., None] * sub_scales).clamp(max=127))
        effective = d[..., None] * sc  # fp32 product of the stored fp16 d and int8 scale, as ggml
        requant = nearest_int(sub / torch.where(effective == 0, 1.0, effective)[..., None]).clamp(-32, 31) + 32
        codes = torch.where((effective != 0)[..., None], requant, torch.where(empty[..., None, None], 32.0, levels))
        return QuantParams(scale=effective, aux=(d[..., None], sc, codes.reshape(*w.shape[:-1], SUPER_BLOCK) - 32))



    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes().numpy().astype(np.int32) + 32  # (rows, blocks, 256) in [0, 64)
        rows, blocks = codes.shape[:2]
        q = codes.reshape(rows, blocks, 2, 4, 32)  # halves of 128, quarters of 32
        ql = np.concatenate([(q[:, :, :, 0] & 0xF) | ((q[:, :, :, 2] & 0xF) << 4),
                             (q[:, :, :, 1] & 0xF) | ((q[:, :, :, 3] & 0xF) << 4)], axis=-1)  # (r, b, 2, 64)
        high = q >> 4
        qh = high[:, :, :, 0] | (high[:, :, :, 1] << 2) | (high[:, :, :, 2] << 4) | (high[:, :, :, 3] << 6)
        d, sc = qw.params.aux[0], qw.params.aux[1]
        parts = [ql.reshape(rows, blocks, 128).astype(np.uint8), qh.reshape(rows, blocks, 64).astype(np.uint8),
                 sc.numpy().astype(np.int8).view(np.uint8), d.numpy().astype("<f2").view(np.uint8)]
        return assemble_blocks(parts, rows)


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's asymmetric (scale, min) search, vectorized over leading dims of x (..., n).

    Returns (scale, the_min, L in [0, nmax]) with x ~ scale * L - the_min.
    """
    n = x.shape[-1]
    sum_w, sum_x = weights[..., 0], weights[..., 0] * x[..., 0]
    for i in range(1, n):
        sum_w = sum_w + weights[..., i]
        sum_x = sum_x + weights[..., i] * x[..., i]
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1)
    flat = hi == lo

    def levels_for(iscale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        return nearest_int(iscale[..., None] * (x - minimum[..., None])).clamp(0, nmax)

    def span(minimum: torch.Tensor) -> torch.Tensor:
        # ggml keeps searching from the best (scale, min) so far: later steps use the updated min
        return torch.where(flat, torch.ones_like(hi), hi - minimum)

    def weighted_error(scale, minimum, levels) -> torch.Tensor:
        err = torch.zeros_like(sum_w)
        for i in range(n):
            diff = scale * levels[..., i] + minimum - x[..., i]
            err = err + weights[..., i] * (diff.abs() if use_mad else diff * diff)
        return err

    minimum = lo
    iscale = rdiv(nmax, span(minimum))
    scale = rdiv(1.0, iscale)
    levels = levels_for(iscale, minimum)
    best_error = weighted_error(scale, minimum, levels)
    for step in range(nstep + 1):
        cand = levels_for(rdiv(np.float32(rmin) + np.float32(rdelta) * step + nmax, span(minimum)), minimum)
        sum_l = torch.zeros_like(sum_w)
        sum_l2 = torch.zeros_like(sum_w)
        sum_xl = torch.zeros_like(sum_w)
        for i in range(n):
            w, li = weights[..., i], cand[..., i]
            sum_l = sum_l + w * li
            sum_l2 = sum_l2 + w * li * li
            sum_xl = sum_xl + w * li * x[..., i]
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = torch.where(ok, det, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        better = ok & (weighted_error(this_scale, this_min, cand) < best_error)
        levels = torch.where(better[..., None], cand, levels)
        best_error = torch.where(better, weighted_error(this_scale, this_min, cand), best_error)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    levels = torch.where(flat[..., None], torch.zeros_like(levels), levels)
    scale = torch.where(flat, 0.0, scale)
    return scale, -minimum, levels


def _pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins (..., 8) into ggml's 12-byte layout."""
    out = np.zeros((*ls.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:4] = ls[..., 0:4] | ((ls[..., 4:8] >> 4) << 6)
    out[..., 4:8] = lm[..., 0:4] | ((lm[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (ls[..., 4:8] & 0xF) | ((lm[..., 4:8] & 0xF) << 4)
    return out


@dataclass(frozen=True)
class _Q45K(_KQuant):
    """Q4_K / Q5_K: eight 32-weight sub-blocks, 6-bit scales and mins under fp16 d and dmin."""

    sub_blocks: int = 8
    search: tuple[float, float, int] = (-1.0, 0.1, 20)  # rmin, rdelta, nstep of ggml's search

    def fit(self, w: torch.Tensor) -> QuantParams:
        nmax = 2**self.bits - 1
        sub = w.float().reshape(*w.shape[:-1], 8, 32)
        sum_x2 = torch.zeros(sub.shape[:-1])
        for i in range(32):
            sum_x2 = sum_x2 + sub[..., i] * sub[..., i]
        # sqrt in fp64 then rounded: exactly sqrtf's result (torch's fp32 sqrt kernel can be off by an ulp)
        weights = torch.sqrt(sum_x2.double() / 32).float()[..., None] + sub.abs()
        scales, mins, levels = make_qkx2_quants(sub, weights, nmax, *self.search)
        max_scale = scales.amax(-1).clamp(min=0)
        max_min = mins.amax(-1).clamp(min=0)
        inv_scale = torch.where(max_scale > 0, rdiv(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
        inv_min = torch.where(max_min > 0, rdiv(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
        ls = nearest_int(inv_scale[..., None] * scales).clamp(0, 63)
        lm = nearest_int(inv_min[..., None] * mins).clamp(0, 63)
        d = _fp16_round(max_scale / 63.0)
        dmin = _fp16_round(max_min / 63.0)
        eff_scale = d[..., None] * ls
        eff_min = dmin[..., None] * lm
        requant = nearest_int((sub + eff_min[..., None]) / torch.where(eff_scale == 0, 1.0, eff_scale)[..., None])
        codes = torch.where((eff_scale != 0)[..., None], requant.clamp(0, nmax), levels)
        return QuantParams(scale=eff_scale, minimum=-eff_min,
                           aux=(d[..., None], dmin[..., None], ls, lm, codes.reshape(*w.shape[:-1], SUPER_BLOCK)))



    def _header(self, qw: QuantizedWeight) -> list[np.ndarray]:
        d, dmin, ls, lm = qw.params.aux[:4]
        scales = _pack_scales_mins(ls.numpy().astype(np.uint8), lm.numpy().astype(np.uint8))
        return [d.numpy().astype("<f2").view(np.uint8), dmin.numpy().astype("<f2").view(np.uint8), scales]

    @staticmethod
    def _assemble(parts: list[np.ndarray], rows: int, blocks: int) -> np.ndarray:
        return assemble_blocks(parts, rows)


@dataclass(frozen=True)
class Q4_K(_Q45K):
    """Q4_K block (144 bytes): d f16, dmin f16, scales[12], qs[128] (low nibble: weight l of a 64-chunk,
    high nibble: weight l + 32)."""

    name: str = "Q4_K"
    bits: int = 4
    block_bytes: int = 144
    search: tuple[float, float, int] = (-1.0, 0.1, 20)

    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes().numpy().astype(np.uint8)
        rows, blocks = codes.shape[:2]
        q = codes.reshape(rows, blocks, 4, 2, 32)
        qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(rows, blocks, 128)
        return assemble_blocks([*self._header(qw), qs], rows)


@dataclass(frozen=True)
class Q5_K(_Q45K):
    """Q5_K block (176 bytes): d, dmin, scales[12], qh[32] (bit 2c / 2c+1 of byte l: high bit of weight
    l / l + 32 of 64-chunk c), qs[128] as Q4_K."""

    name: str = "Q5_K"
    bits: int = 5
    block_bytes: int = 176
    search: tuple[float, float, int] = (-0.5, 0.1, 15)

    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes().numpy().astype(np.uint8)
        rows, blocks = codes.shape[:2]
        q = codes.reshape(rows, blocks, 4, 2, 32)
        low = q & 0xF
        qs = (low[:, :, :, 0] | (low[:, :, :, 1] << 4)).reshape(rows, blocks, 128)
        high = (q >> 4) & 1  # (rows, blocks, chunk, half, 32)
        shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)  # bit 2c + half
        qh = np.bitwise_or.reduce(high << shifts[None, None, :, :, None], axis=(2, 3)).astype(np.uint8)
        return assemble_blocks([*self._header(qw), qh, qs], rows)


@dataclass(frozen=True)
class Q2_K(_KQuant):
    """Q2_K block (84 bytes): scales[16] (low nibble scale, high nibble min), qs[64] (four 2-bit codes
    per byte: weights l, l+32, l+64, l+96 of a 128-chunk), d f16, dmin f16."""

    name: str = "Q2_K"
    bits: int = 2
    block_bytes: int = 84

    def fit(self, w: torch.Tensor) -> QuantParams:
        sub = w.float().reshape(*w.shape[:-1], 16, 16)
        scales, mins, levels = make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, use_mad=True)
        max_scale = scales.amax(-1).clamp(min=0)
        max_min = mins.amax(-1).clamp(min=0)
        # 4-bit sub-block scales and mins; ggml does not clamp them (they cannot exceed 15)
        inv_scale = rdiv(15.0, _nonzero(max_scale))[..., None]
        ls = torch.where(max_scale[..., None] > 0, nearest_int(inv_scale * scales), 0.0)
        lm = torch.where(max_min[..., None] > 0, nearest_int(rdiv(15.0, _nonzero(max_min))[..., None] * mins), 0.0)
        d = torch.where(max_scale > 0, _fp16_round(max_scale / 15.0), 0.0)
        dmin = torch.where(max_min > 0, _fp16_round(max_min / 15.0), 0.0)
        eff_scale = d[..., None] * ls
        eff_min = dmin[..., None] * lm
        requant = nearest_int((sub + eff_min[..., None]) / torch.where(eff_scale == 0, 1.0, eff_scale)[..., None])
        codes = torch.where((eff_scale != 0)[..., None], requant.clamp(0, 3), levels)
        return QuantParams(scale=eff_scale, minimum=-eff_min,
                           aux=(d[..., None], dmin[..., None], ls, lm, codes.reshape(*w.shape[:-1], SUPER_BLOCK)))



    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes().numpy().astype(np.uint8)
        rows, blocks = codes.shape[:2]
        q = codes.reshape(rows, blocks, 2, 4, 32)  # 128-chunks, quarters of 32
        packed = q[:, :, :, 0] | (q[:, :, :, 1] << 2) | (q[:, :, :, 2] << 4) | (q[:, :, :, 3] << 6)
        qs = packed.reshape(rows, blocks, 64)
        d, dmin, ls, lm = qw.params.aux[:4]
        scales = (ls.numpy().astype(np.uint8) | (lm.numpy().astype(np.uint8) << 4))
        parts = [scales, qs, d.numpy().astype("<f2").view(np.uint8), dmin.numpy().astype("<f2").view(np.uint8)]
        return assemble_blocks(parts, rows)


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, t, torch.ones_like(t))


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's symmetric search with x^2 weights and coordinate refinement (do_rmse), vectorized over
    leading dims of x (..., n). Returns (scale, L in [0, 2*nmax)); all-zero groups get L = 0."""
    amax = x.abs().amax(-1)
    signed_max = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))[..., 0]
    empty = amax < GROUP_MAX_EPS
    iscale = rdiv(-nmax, torch.where(empty, torch.ones_like(signed_max), signed_max))
    levels = nearest_int(iscale[..., None] * x).clamp(-nmax, nmax - 1)
    weights = x * x
    sumlx = torch.zeros_like(amax)
    suml2 = torch.zeros_like(amax)
    for i in range(x.shape[-1]):
        sumlx = sumlx + weights[..., i] * x[..., i] * levels[..., i]
        suml2 = suml2 + weights[..., i] * levels[..., i] * levels[..., i]
    for _ in range(5):  # a pass without changes leaves the state as it was, so all five passes are safe
        for i in range(x.shape[-1]):
            w, xi, li = weights[..., i], x[..., i], levels[..., i]
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            new_l = nearest_int(xi * sl2 / torch.where(slx > 0, slx, 1.0)).clamp(-nmax, nmax - 1)
            slx2 = slx + w * xi * new_l
            sl22 = sl2 + w * new_l * new_l
            take = (slx > 0) & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            levels[..., i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    levels = torch.where(empty[..., None], torch.zeros_like(levels), levels + nmax)
    return torch.where(empty, 0.0, scale), levels


@dataclass(frozen=True)
class Q3_K(_KQuant):
    """Q3_K block (110 bytes): hmask[32] (bit b of byte m: high bit of weight 32b + m), qs[64] low two
    bits as Q2_K, scales[12] (sixteen 6-bit scales: low nibbles in bytes 0-7, high pairs in 8-11), d f16."""

    name: str = "Q3_K"
    bits: int = 3
    block_bytes: int = 110

    def fit(self, w: torch.Tensor) -> QuantParams:
        sub = w.float().reshape(*w.shape[:-1], 16, 16)
        scales, levels = make_q3_quants(sub, 4)
        max_scale = torch.gather(scales, -1, scales.abs().argmax(-1, keepdim=True))[..., 0]
        has_scale = max_scale != 0
        iscale = rdiv(-32.0, torch.where(has_scale, max_scale, torch.ones_like(max_scale)))
        sc = torch.where(has_scale[..., None], nearest_int(iscale[..., None] * scales).clamp(-32, 31), 0.0)
        d = torch.where(has_scale, _fp16_round(rdiv(1.0, iscale)), 0.0)
        effective = d[..., None] * sc
        requant = nearest_int(sub / torch.where(effective == 0, 1.0, effective)[..., None]).clamp(-4, 3) + 4
        codes = torch.where((effective != 0)[..., None], requant, levels) - 4
        return QuantParams(scale=effective, aux=(d[..., None], sc + 32, codes.reshape(*w.shape[:-1], SUPER_BLOCK)))



    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes().numpy().astype(np.int32) + 4  # (rows, blocks, 256) in [0, 8)
        rows, blocks = codes.shape[:2]
        high = (codes >> 2) & 1
        hmask = np.bitwise_or.reduce(high.reshape(rows, blocks, 8, 32) << np.arange(8)[None, None, :, None], axis=2)
        q = (codes & 3).reshape(rows, blocks, 2, 4, 32)
        packed = q[:, :, :, 0] | (q[:, :, :, 1] << 2) | (q[:, :, :, 2] << 4) | (q[:, :, :, 3] << 6)
        qs = packed.reshape(rows, blocks, 64)
        levels = qw.params.aux[1].numpy().astype(np.int32)  # (rows, blocks, 16) in [0, 64)
        scales = np.zeros((rows, blocks, 12), dtype=np.int32)
        scales[..., 0:8] = (levels[..., 0:8] & 0xF) | ((levels[..., 8:16] & 0xF) << 4)
        for j in range(16):
            scales[..., 8 + j % 4] |= (levels[..., j] >> 4) << (2 * (j // 4))
        d = qw.params.aux[0].numpy().astype("<f2").view(np.uint8)
        parts = [hmask.astype(np.uint8), qs.astype(np.uint8), scales.astype(np.uint8), d]
        return assemble_blocks(parts, rows)
