"""GGUF k-quants as grids: 256-weight super-blocks with sub-block scales.

Round-to-nearest on these grids follows ggml's quantizer step for step (its scale search, rounding,
and element-by-element fp32 sums), so the bytes equal llama.cpp's own quantizer output (tested),
without an importance matrix (ggml's ``quantize_row_*_ref``) and with one (``quantize_row_*_impl``:
the imatrix weights each weight's error, and the sub-block scales are searched too, by
``make_qp_quants`` / ``make_qx_quants`` weighted by each sub-block's total weight).

Q6_K block (210 bytes): ql[128] low 4 bits, qh[64] high 2 bits, scales int8[16], d f16. Weight j of
sub-block s decodes as d * scales[s] * (q - 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quantkit.grids.base import QuantizedWeight, QuantParams
from quantkit.grids.ggml_search import (
    GROUP_MAX_EPS,
    imatrix_weights,
    make_q3_quants,
    make_qkx2_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    positive_max,
    rdiv,
    sequential_sum,
    signed_absmax,
)
from quantkit.grids.gguf_legacy import GGUFBlockGrid, _fp16_round, assemble_blocks, read_f16

SUPER_BLOCK = 256


@dataclass(frozen=True)
class _KQuant(GGUFBlockGrid):
    """A 256-weight super-block type. ggml picks codes and two levels of scales together in ``fit``
    (the codes ride in the last ``aux`` tensor) and ``encode`` returns those codes, which keeps
    round-to-nearest byte-identical to llama.cpp. GPTQ instead rounds one column at a time on the
    fitted sub-block scale and minimum (``column_params``), which decode exactly as ggml's."""

    group_size: int = SUPER_BLOCK
    column_encodable: bool = False  # encode answers with the fit's codes, whatever weights it is given
    uses_importance: bool = True
    sub_blocks: int = 16
    code_range: tuple[int, int] = (0, 3)  # codes as decode reads them (symmetric types are centred on 0)

    def costly_search(self, importance: torch.Tensor | None) -> bool:
        return True  # ggml's k-quant searches loop over every weight: C beats torch by orders of magnitude

    def encode(self, w: torch.Tensor, params: QuantParams) -> torch.Tensor:
        if params.aux:  # a whole super-block's fit: ggml's codes
            return params.aux[-1].to(torch.int32)
        scale = params.scale[..., None]  # (..., n_scales, 1) over (..., n_scales, weights per scale)
        x = _per_scale(w, params.scale.shape[-1])
        if params.minimum is not None:
            x = x - params.minimum[..., None]
        q = torch.round(x / torch.where(scale == 0, 1.0, scale)).clamp(*self.code_range)
        return torch.where(scale == 0, 0.0, q).reshape(w.shape).to(torch.int32)  # a zero scale decodes any code alike

    def decode(self, codes: torch.Tensor, params: QuantParams) -> torch.Tensor:
        out = _per_scale(codes.float(), params.scale.shape[-1]) * params.scale[..., None]
        if params.minimum is not None:
            out = out + params.minimum[..., None]
        return out.reshape(codes.shape)

    def column_params(self, params: QuantParams, offset: int) -> QuantParams:
        s = offset // (self.group_size // self.sub_blocks)
        minimum = None if params.minimum is None else params.minimum[..., s : s + 1]
        return QuantParams(scale=params.scale[..., s : s + 1], minimum=minimum)

    def with_codes(self, params: QuantParams, codes: torch.Tensor) -> QuantParams:
        return QuantParams(params.scale, params.zero, params.minimum, params.inv_scale,
                           aux=(*params.aux[:-1], codes.to(params.aux[-1].dtype)))


def _per_scale(x: torch.Tensor, n_scales: int) -> torch.Tensor:
    """``x`` (..., n) split into (..., n_scales, n / n_scales): the weights each scale covers."""
    return x.reshape(*x.shape[:-1], n_scales, -1)


def _floats(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).astype(np.float32))


def _unpack_2bit(packed: np.ndarray) -> np.ndarray:
    """Inverse of the 2-bit packing of Q2_K / Q3_K: (..., 2, 32) bytes -> (..., 256) codes in 128-chunks
    of four 32-weight quarters (quarter k in bits 2k, 2k + 1)."""
    quarters = np.stack([(packed >> (2 * k)) & 3 for k in range(4)], axis=-2)  # (..., 2, 4, 32)
    return quarters.reshape(*packed.shape[:-2], 256).astype(np.int32)


def _sub_blocks(importance: torch.Tensor, size: int) -> torch.Tensor:
    """Per-column importance (..., 256) split like the weights into sub-blocks (..., 256 / size, size)."""
    return importance.float().reshape(*importance.shape[:-1], SUPER_BLOCK // size, size)


def _imatrix_setup(sub: torch.Tensor, importance: torch.Tensor, sigma_factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's per-weight error weights of a super-block under an imatrix, and their per-sub-block sums.

    sigma2 is the super-block's mean square (times 2 for Q3_K-Q5_K, as ggml has it), summed in order.
    """
    x = sub.reshape(*sub.shape[:-2], SUPER_BLOCK)
    sigma2 = sigma_factor * sequential_sum(x * x) / SUPER_BLOCK  # / 256 is exact: no rounding question
    weights = imatrix_weights(sub, _sub_blocks(importance, sub.shape[-1]), sigma2[..., None, None])
    return weights, sequential_sum(weights)


@dataclass(frozen=True)
class Q6_K(_KQuant):
    name: str = "Q6_K"
    code_range: tuple[int, int] = (-32, 31)
    bits: int = 6
    block_bytes: int = 210

    def reference_fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        sub = w.float().reshape(*w.shape[:-1], 16, 16)
        # ggml weights Q6_K's search by the raw imatrix (its sigma2 variant is commented out there)
        sub_scales, levels = make_qx_quants(sub, 32, None if importance is None else _sub_blocks(importance, 16))
        max_scale = signed_absmax(sub_scales)
        empty = max_scale.abs() < GROUP_MAX_EPS  # ggml writes such a super-block as all zero bytes
        iscale = rdiv(-128.0, torch.where(empty, torch.ones_like(max_scale), max_scale))
        d = torch.where(empty, 0.0, _fp16_round(rdiv(1.0, iscale)))
        sc = torch.where(empty[..., None], 0.0, nearest_int(iscale[..., None] * sub_scales).clamp(max=127))
        effective = d[..., None] * sc  # fp32 product of the stored fp16 d and int8 scale, as ggml
        requant = nearest_int(sub / torch.where(effective == 0, 1.0, effective)[..., None]).clamp(-32, 31) + 32
        codes = torch.where((effective != 0)[..., None], requant, torch.where(empty[..., None, None], 0.0, levels))
        return QuantParams(scale=effective, aux=(d[..., None], sc, codes.reshape(*w.shape[:-1], SUPER_BLOCK) - 32))

    def params_from_blocks(self, raw: np.ndarray) -> QuantParams:
        lead = raw.shape[:-1]
        ql = raw[..., 0:128].reshape(*lead, 2, 2, 32).astype(np.int32)  # (half, low/high nibble pair, 32)
        qh = raw[..., 128:192].reshape(*lead, 2, 32).astype(np.int32)
        low = np.stack([ql[..., 0, :] & 0xF, ql[..., 1, :] & 0xF, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], axis=-2)
        high = np.stack([(qh >> (2 * k)) & 3 for k in range(4)], axis=-2)  # (..., half, quarter, 32)
        codes = (low | (high << 4)).reshape(*lead, SUPER_BLOCK) - 32
        sc = _floats(raw[..., 192:208].view(np.int8))
        d = read_f16(raw, 208)
        return QuantParams(scale=d * sc, aux=(d, sc, _floats(codes)))

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


def _unpack_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``_pack_scales_mins``: 12 bytes -> eight 6-bit scales and eight 6-bit mins."""
    p = packed.astype(np.int32)
    ls = np.concatenate([p[..., 0:4] & 63, (p[..., 8:12] & 0xF) | ((p[..., 0:4] >> 6) << 4)], axis=-1)
    lm = np.concatenate([p[..., 4:8] & 63, (p[..., 8:12] >> 4) | ((p[..., 4:8] >> 6) << 4)], axis=-1)
    return ls, lm


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

    def reference_fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        nmax = 2**self.bits - 1
        sub = w.float().reshape(*w.shape[:-1], 8, 32)
        search = self._plain_search if importance is None else self._imatrix_search
        d, dmin, ls, lm, levels = search(sub, nmax, importance)
        eff_scale = d[..., None] * ls
        eff_min = dmin[..., None] * lm
        requant = nearest_int((sub + eff_min[..., None]) / torch.where(eff_scale == 0, 1.0, eff_scale)[..., None])
        codes = torch.where((eff_scale != 0)[..., None], requant.clamp(0, nmax), levels)
        return QuantParams(scale=eff_scale, minimum=-eff_min,
                           aux=(d[..., None], dmin[..., None], ls, lm, codes.reshape(*w.shape[:-1], SUPER_BLOCK)))

    def _plain_search(self, sub: torch.Tensor, nmax: int, _importance: None) -> tuple[torch.Tensor, ...]:
        """ggml's quantize_row_q{4,5}_K_ref: weights |x| + rms of the sub-block, scales rounded from the max."""
        sum_x2 = sequential_sum(sub * sub)
        # sqrt in fp64 then rounded: exactly sqrtf's result (torch's fp32 sqrt kernel can be off by an ulp)
        weights = torch.sqrt(sum_x2.double() / 32).float()[..., None] + sub.abs()
        scales, mins, levels = make_qkx2_quants(sub, weights, nmax, *self.search)
        max_scale = positive_max(scales)
        max_min = positive_max(mins)
        inv_scale = torch.where(max_scale > 0, rdiv(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
        inv_min = torch.where(max_min > 0, rdiv(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
        ls = nearest_int(inv_scale[..., None] * scales).clamp(0, 63)
        lm = nearest_int(inv_min[..., None] * mins).clamp(0, 63)
        return _fp16_round(max_scale / 63.0), _fp16_round(max_min / 63.0), ls, lm, levels

    def _imatrix_search(self, sub: torch.Tensor, nmax: int, importance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ggml's quantize_row_q{4,5}_K_impl: imatrix-weighted (scale, min) per sub-block, then the
        6-bit scales and mins searched with each sub-block's total weight."""
        weights, sub_weight = _imatrix_setup(sub, importance, 2)
        scales, mins, levels = make_qkx2_quants(sub, weights, nmax, -0.9, 0.05, 36)
        d, ls = make_qp_quants(scales, 63, sub_weight)
        dmin, lm = make_qp_quants(mins, 63, sub_weight)
        return _fp16_round(d), _fp16_round(dmin), ls, lm, levels

    def params_from_blocks(self, raw: np.ndarray) -> QuantParams:
        d, dmin = read_f16(raw, 0), read_f16(raw, 2)
        ls, lm = _unpack_scales_mins(raw[..., 4:16])
        ls, lm = _floats(ls), _floats(lm)
        codes = self.read_codes(raw)
        return QuantParams(scale=d * ls, minimum=-(dmin * lm), aux=(d, dmin, ls, lm, _floats(codes)))

    @staticmethod
    def _read_low_nibbles(qs: np.ndarray) -> np.ndarray:
        """Inverse of ``_low_nibbles``: qs[128] -> (..., 4, 2, 32) low four bits of the codes."""
        q = qs.reshape(*qs.shape[:-1], 4, 1, 32).astype(np.int32)
        return np.concatenate([q & 0xF, q >> 4], axis=-2)

    def _header(self, qw: QuantizedWeight) -> list[np.ndarray]:
        d, dmin, ls, lm = qw.params.aux[:4]
        scales = _pack_scales_mins(ls.numpy().astype(np.uint8), lm.numpy().astype(np.uint8))
        return [d.numpy().astype("<f2").view(np.uint8), dmin.numpy().astype("<f2").view(np.uint8), scales]

    @staticmethod
    def _low_nibbles(q: np.ndarray) -> np.ndarray:
        """qs[128] of (rows, blocks, 4, 2, 32) codes: low nibble weight l of a 64-chunk, high nibble l + 32."""
        low = q & 0xF
        return (low[:, :, :, 0] | (low[:, :, :, 1] << 4)).reshape(*q.shape[:2], 128)


@dataclass(frozen=True)
class Q4_K(_Q45K):
    """Q4_K block (144 bytes): d f16, dmin f16, scales[12], qs[128] (low nibble: weight l of a 64-chunk,
    high nibble: weight l + 32)."""

    name: str = "Q4_K"
    code_range: tuple[int, int] = (0, 15)
    bits: int = 4
    block_bytes: int = 144
    search: tuple[float, float, int] = (-1.0, 0.1, 20)

    def read_codes(self, raw: np.ndarray) -> np.ndarray:
        return self._read_low_nibbles(raw[..., 16:144]).reshape(*raw.shape[:-1], SUPER_BLOCK)

    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes().numpy().astype(np.uint8)
        rows, blocks = codes.shape[:2]
        return assemble_blocks([*self._header(qw), self._low_nibbles(codes.reshape(rows, blocks, 4, 2, 32))], rows)


@dataclass(frozen=True)
class Q5_K(_Q45K):
    """Q5_K block (176 bytes): d, dmin, scales[12], qh[32] (bit 2c / 2c+1 of byte l: high bit of weight
    l / l + 32 of 64-chunk c), qs[128] as Q4_K."""

    name: str = "Q5_K"
    code_range: tuple[int, int] = (0, 31)
    bits: int = 5
    block_bytes: int = 176
    search: tuple[float, float, int] = (-0.5, 0.1, 15)

    def read_codes(self, raw: np.ndarray) -> np.ndarray:
        low = self._read_low_nibbles(raw[..., 48:176])  # (..., chunk, half, 32)
        qh = raw[..., 16:48].astype(np.int32)[..., None, None, :]
        shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :])[..., None]  # bit 2c + half
        return (low | (((qh >> shifts) & 1) << 4)).reshape(*raw.shape[:-1], SUPER_BLOCK)

    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes().numpy().astype(np.uint8)
        rows, blocks = codes.shape[:2]
        q = codes.reshape(rows, blocks, 4, 2, 32)
        qs = self._low_nibbles(q)
        high = (q >> 4) & 1  # (rows, blocks, chunk, half, 32)
        shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)  # bit 2c + half
        qh = np.bitwise_or.reduce(high << shifts[None, None, :, :, None], axis=(2, 3)).astype(np.uint8)
        return assemble_blocks([*self._header(qw), qh, qs], rows)


@dataclass(frozen=True)
class Q2_K(_KQuant):
    """Q2_K block (84 bytes): scales[16] (low nibble scale, high nibble min), qs[64] (four 2-bit codes
    per byte: weights l, l+32, l+64, l+96 of a 128-chunk), d f16, dmin f16."""

    name: str = "Q2_K"
    code_range: tuple[int, int] = (0, 3)
    bits: int = 2
    block_bytes: int = 84

    def reference_fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        sub = w.float().reshape(*w.shape[:-1], 16, 16)
        search = self._plain_search(sub) if importance is None else self._imatrix_search(sub, importance)
        d, dmin, ls, lm, levels = search
        eff_scale = d[..., None] * ls
        eff_min = dmin[..., None] * lm
        requant = nearest_int((sub + eff_min[..., None]) / torch.where(eff_scale == 0, 1.0, eff_scale)[..., None])
        codes = torch.where((eff_scale != 0)[..., None], requant.clamp(0, 3), levels)
        return QuantParams(scale=eff_scale, minimum=-eff_min,
                           aux=(d[..., None], dmin[..., None], ls, lm, codes.reshape(*w.shape[:-1], SUPER_BLOCK)))

    @staticmethod
    def _plain_search(sub: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ggml's quantize_row_q2_K_ref: |x|-weighted absolute error, 4-bit scales rounded from the max."""
        scales, mins, levels = make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, use_mad=True)
        max_scale = positive_max(scales)
        max_min = positive_max(mins)
        # 4-bit sub-block scales and mins; ggml does not clamp them (they cannot exceed 15)
        inv_scale = rdiv(15.0, _nonzero(max_scale))[..., None]
        ls = torch.where(max_scale[..., None] > 0, nearest_int(inv_scale * scales), 0.0)
        lm = torch.where(max_min[..., None] > 0, nearest_int(rdiv(15.0, _nonzero(max_min))[..., None] * mins), 0.0)
        d = torch.where(max_scale > 0, _fp16_round(max_scale / 15.0), 0.0)
        dmin = torch.where(max_min > 0, _fp16_round(max_min / 15.0), 0.0)
        return d, dmin, ls, lm, levels

    @staticmethod
    def _imatrix_search(sub: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ggml's quantize_row_q2_K_impl: imatrix-weighted squared error, 4-bit scales and mins searched
        with each sub-block's total weight."""
        weights, sub_weight = _imatrix_setup(sub, importance, 1)
        scales, mins, levels = make_qkx2_quants(sub, weights, 3, -0.9, 0.05, 36)
        d, ls = make_qp_quants(scales, 15, sub_weight)
        dmin, lm = make_qp_quants(mins, 15, sub_weight)
        return _fp16_round(d), _fp16_round(dmin), ls, lm, levels

    def params_from_blocks(self, raw: np.ndarray) -> QuantParams:
        scales = raw[..., 0:16].astype(np.int32)
        ls, lm = _floats(scales & 0xF), _floats(scales >> 4)
        codes = _unpack_2bit(raw[..., 16:80].reshape(*raw.shape[:-1], 2, 32))
        d, dmin = read_f16(raw, 80), read_f16(raw, 82)
        return QuantParams(scale=d * ls, minimum=-(dmin * lm), aux=(d, dmin, ls, lm, _floats(codes)))

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


@dataclass(frozen=True)
class Q3_K(_KQuant):
    """Q3_K block (110 bytes): hmask[32] (bit b of byte m: high bit of weight 32b + m), qs[64] low two
    bits as Q2_K, scales[12] (sixteen 6-bit scales: low nibbles in bytes 0-7, high pairs in 8-11), d f16."""

    name: str = "Q3_K"
    code_range: tuple[int, int] = (-4, 3)
    bits: int = 3
    block_bytes: int = 110

    def reference_fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        sub = w.float().reshape(*w.shape[:-1], 16, 16)
        d, stored, levels = self._plain_search(sub) if importance is None else self._imatrix_search(sub, importance)
        effective = d[..., None] * (stored - 32)  # stored 6-bit scales are offset by 32
        requant = nearest_int(sub / torch.where(effective == 0, 1.0, effective)[..., None]).clamp(-4, 3) + 4
        codes = torch.where((effective != 0)[..., None], requant, levels) - 4
        return QuantParams(scale=effective, aux=(d[..., None], stored, codes.reshape(*w.shape[:-1], SUPER_BLOCK)))

    @staticmethod
    def _plain_search(sub: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ggml's quantize_row_q3_K_ref: x^2-weighted refined search, scales rounded from the signed max."""
        scales, levels = make_q3_quants(sub, 4)
        max_scale = signed_absmax(scales)
        has_scale = max_scale != 0
        iscale = rdiv(-32.0, torch.where(has_scale, max_scale, torch.ones_like(max_scale)))
        sc = nearest_int(iscale[..., None] * scales).clamp(-32, 31)
        d = torch.where(has_scale, _fp16_round(rdiv(1.0, iscale)), 0.0)
        # without any scale ggml leaves the scale bytes zeroed (stored 0, not 32)
        return d, torch.where(has_scale[..., None], sc + 32, 0.0), levels

    @staticmethod
    def _imatrix_search(sub: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ggml's quantize_row_q3_K_impl: imatrix-weighted symmetric search per sub-block, then the
        6-bit scales searched the same way, weighted by each sub-block's total weight."""
        weights, sub_weight = _imatrix_setup(sub, importance, 2)
        scales, levels = make_qx_quants(sub, 4, weights)
        d, stored = make_qx_quants(scales, 32, sub_weight)
        return _fp16_round(d), stored, levels

    def params_from_blocks(self, raw: np.ndarray) -> QuantParams:
        lead = raw.shape[:-1]
        hmask = raw[..., 0:32].astype(np.int32)[..., None, :]  # bit b of byte m: weight 32 b + m
        high = ((hmask >> np.arange(8)[:, None]) & 1).reshape(*lead, SUPER_BLOCK)
        low = _unpack_2bit(raw[..., 32:96].reshape(*lead, 2, 32))
        codes = (low | (high << 2)) - 4
        packed = raw[..., 96:108].astype(np.int32)
        j = np.arange(16)
        nibble = np.where(j < 8, packed[..., j % 8] & 0xF, packed[..., j % 8] >> 4)
        stored = nibble | (((packed[..., 8 + j % 4] >> (2 * (j // 4))) & 3) << 4)
        d = read_f16(raw, 108)
        stored = _floats(stored)
        return QuantParams(scale=d * (stored - 32), aux=(d, stored, _floats(codes)))

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
