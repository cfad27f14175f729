"""GGUF's non-linear 4-bit types: IQ4_NL and IQ4_XS.

A 4-bit code indexes a fixed table of 16 signed values (ggml's ``kvalues_iq4nl``), denser near zero where
most weights are, times a scale per 32 weights. IQ4_NL (18 bytes per 32 weights, 4.5 bits): an fp16 scale
and 16 bytes of codes per block. IQ4_XS (136 bytes per 256 weights, 4.25 bits): one fp16 super-block
scale ``d``, a 6-bit integer ``ls`` per 32-weight sub-block (low 4 bits in ``scales_l``, high 2 in
``scales_h``), sub-block scale ``d * (ls - 32)``, then the codes.

ggml searches the scales (7 trial scales per block, weighted by the importance matrix or by ``x^2``);
quantkit runs that search in ggml's own C library (llama-cpp-python's, see ``ggml_lib``) and reads the
scales and codes back, so the bytes are llama-quantize's. There is no torch reference of the search yet:
these types need the ``llama`` extra. GPTQ rounds each column to the nearest table value on the scales
ggml fitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.grids.base import QuantizedWeight, QuantParams
from quantkit.grids.gguf_legacy import GGUFBlockGrid, _halves, assemble_blocks, read_f16, read_halves

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
    torch_reference: bool = False

    def costly_search(self, importance: torch.Tensor | None) -> bool:
        return True  # the search exists only in ggml's C library

    def reference_fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        raise QuantkitError(f"{self.name} is quantized by ggml's own library, which is missing (or "
                            "QUANTKIT_GGUF_ENGINE=torch); pip install 'quantkit[llama]' and use the default engine")

    def round_to_bytes(self, rows: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
        from quantkit.grids import ggml_lib

        if ggml_lib.engine() != "ggml":
            self.reference_fit(rows)  # raises: there is no torch path
        return super().round_to_bytes(rows, importance)

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


@dataclass(frozen=True)
class IQ4_NL(_NonLinear4):
    name: str = "IQ4_NL"
    block_bytes: int = 18

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
