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
from quantkit.grids.gguf_legacy import GGUFBlockGrid, _fp16_round

SUPER_BLOCK = 256
GROUP_MAX_EPS = 1e-15


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

    levels, sumlx, suml2 = trial(-nmax / safe_max)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s != 0]:
        cand, sumlx, suml2 = trial(-(nmax + np.float32(0.1) * step) / safe_max)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = torch.where(better[..., None], cand, levels)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1.0), scale)
        best = torch.where(better, scale * sumlx, best)
    empty = amax < GROUP_MAX_EPS
    levels = torch.where(empty[..., None], torch.zeros_like(levels), levels)
    scale = torch.where(empty, torch.zeros_like(scale), scale)
    return scale, levels + nmax


@dataclass(frozen=True)
class Q6_K(GGUFBlockGrid):
    name: str = "Q6_K"
    bits: int = 6
    group_size: int = SUPER_BLOCK
    block_bytes: int = 210
    column_encodable: bool = False

    def check_shape(self, name: str, shape: tuple[int, ...]) -> str | None:
        if len(shape) != 2:
            return f"{name} is not a matrix"
        if shape[1] % SUPER_BLOCK:
            return f"{self.name} needs rows that are a multiple of {SUPER_BLOCK}; {name} has rows of {shape[1]}"
        return None

    def fit(self, w: torch.Tensor) -> QuantParams:
        sub = w.float().reshape(*w.shape[:-1], 16, 16)
        sub_scales, levels = make_qx_quants(sub, 32)  # (..., 16), (..., 16, 16)
        max_abs = sub_scales.abs().amax(-1)
        max_scale = torch.gather(sub_scales, -1, sub_scales.abs().argmax(-1, keepdim=True))[..., 0]
        empty = max_abs < GROUP_MAX_EPS
        iscale = -128.0 / torch.where(empty, torch.ones_like(max_scale), max_scale)
        d = torch.where(empty, 0.0, _fp16_round(1.0 / iscale))
        sc = torch.where(empty[..., None], 0.0, nearest_int(iscale[..., None] * sub_scales).clamp(max=127))
        effective = d[..., None] * sc  # fp32 product of the stored fp16 d and int8 scale, as ggml
        requant = nearest_int(sub / torch.where(effective == 0, 1.0, effective)[..., None]).clamp(-32, 31) + 32
        codes = torch.where((effective != 0)[..., None], requant, torch.where(empty[..., None, None], 32.0, levels))
        return QuantParams(scale=effective, aux=(d[..., None], sc, codes.reshape(*w.shape[:-1], SUPER_BLOCK) - 32))

    def encode(self, w: torch.Tensor, params: QuantParams) -> torch.Tensor:
        return params.aux[2].to(torch.int32)  # ggml decides the codes together with the scales

    def decode(self, codes: torch.Tensor, params: QuantParams) -> torch.Tensor:
        sub = codes.float().reshape(*codes.shape[:-1], 16, 16)
        return (sub * params.scale[..., None]).reshape(codes.shape)

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
        return np.concatenate([p.reshape(rows, blocks, -1) for p in parts], axis=-1).reshape(rows, -1)
