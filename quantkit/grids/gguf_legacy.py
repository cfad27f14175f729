"""GGUF's legacy block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) as grids, plus their byte layouts.

Each grid rounds exactly as ggml's reference quantizer does (fp32 arithmetic, the unrounded fp32
scale for rounding, the fp16 scale stored), so round-to-nearest on these grids reproduces
llama.cpp's files byte for byte. Blocks are 32 consecutive weights of a row.

With an importance matrix (per input column) Q4_0/Q5_0/Q4_1/Q5_1 follow ggml's weighted path
instead (``quantize_row_*_impl``): each block's scale (and min) is searched to minimise the error
weighted by ``imatrix * sqrt(sigma2 + w^2)``, sigma2 being the whole row's mean square; the codes
come out of that search. Q8_0 ignores the importance matrix, as ggml does.

Block layouts (little endian):
  Q8_0: d:f16, qs:int8[32]
  Q4_0: d:f16, qs:u8[16]                nibble j = code[j], high nibble = code[j + 16]
  Q4_1: d:f16, m:f16, qs:u8[16]
  Q5_0: d:f16, qh:u32, qs:u8[16]        qh bit j = bit 4 of code[j]
  Q5_1: d:f16, m:f16, qh:u32, qs:u8[16]
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from quantkit.grids import ggml_lib
from quantkit.grids.base import Grid, QuantizedWeight, QuantParams
from quantkit.grids.ggml_search import imatrix_weights, make_qkx2_quants, make_qx_quants, sequential_sum

BLOCK = 32


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _signed_absmax(w: torch.Tensor) -> torch.Tensor:
    """The value with the largest magnitude in each group, sign kept (first one on ties, as ggml)."""
    index = w.abs().argmax(dim=-1, keepdim=True)
    return torch.gather(w, -1, index)


@dataclass(frozen=True)
class GGUFBlockGrid(Grid):
    """Common parts of the legacy types; subclasses define fit/encode and the byte layout."""

    name: str = ""
    bits: int = 4
    group_size: int = BLOCK
    block_bytes: int = 18
    contiguous_groups_only: bool = True

    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / self.group_size

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        """ggml's fit: in its C library where it is installed and the search is costly (the imatrix
        searches, every k-quant), else the torch reference (``reference_fit``), which gives the same
        parameters and codes."""
        if self.costly_search(importance) and ggml_lib.engine() == "ggml":
            return self._fit_in_ggml(w, importance)
        return self.reference_fit(w, importance)

    def costly_search(self, importance: torch.Tensor | None) -> bool:
        """Whether ggml's C search is worth a round trip (the plain legacy fits are one vector op)."""
        return importance is not None

    @abstractmethod
    def reference_fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        """ggml's search step for step in torch (see ``Grid.fit``)."""

    @abstractmethod
    def params_from_blocks(self, raw: np.ndarray) -> QuantParams:
        """The parameters and codes (last ``aux``) ``reference_fit`` gives, read back from ggml blocks
        ``raw`` shaped ``(..., block_bytes)``; each tensor comes out shaped ``(..., k)``."""

    def _fit_in_ggml(self, w: torch.Tensor, importance: torch.Tensor | None) -> QuantParams:
        # Under an importance matrix a legacy block's weights depend on its whole row (sigma2), so rows
        # stay whole; without one every block stands alone.
        row_dims = 2 if importance is not None else 1
        lead = w.shape[:-row_dims]
        rows = w.float().reshape(int(np.prod(lead, dtype=np.int64)), -1).numpy()
        weights = None if importance is None else importance.float().reshape(-1).numpy()
        raw = ggml_lib.quantize_rows(self.name, rows, weights)
        return self.params_from_blocks(raw.reshape(*w.shape[:-1], self.block_bytes))

    def check_shape(self, name: str, shape: tuple[int, ...]) -> str | None:
        if len(shape) != 2:
            return f"{name} is not a matrix"
        if shape[1] % self.group_size:
            return f"{self.name} needs rows that are a multiple of {self.group_size}; {name} has rows of {shape[1]}"
        return None

    @abstractmethod
    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        """Rows of raw ggml blocks, shape ``(rows, row_bytes)`` uint8."""

    def round_to_bytes(self, rows: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
        """``rows`` (float32 ``(n, n_per_row)``) rounded to nearest on this grid, as raw ggml blocks: by
        ggml's own quantizer where installed (C speed, the bytes llama-quantize writes), else by the
        torch reference (the same bytes)."""
        if ggml_lib.engine() == "ggml":
            weights = None if importance is None else importance.float().numpy()
            return ggml_lib.quantize_rows(self.name, rows.float().numpy(), weights)
        groups = rows.float().reshape(rows.shape[0], -1, self.group_size)
        params = self.fit(groups, None if importance is None else importance.float().reshape(groups.shape[-2:]))
        codes = self.encode(groups, params).reshape(rows.shape)
        return self.to_bytes(QuantizedWeight(codes=codes, params=params, grid=self))

    def column_params(self, params: QuantParams, offset: int) -> QuantParams:
        # a weighted fit's codes (aux) were searched for the original weights; GPTQ rounds its own
        return QuantParams(params.scale, params.zero, params.minimum, params.inv_scale)

    def with_codes(self, params: QuantParams, codes: torch.Tensor) -> QuantParams:
        if not params.aux:
            return params
        return QuantParams(params.scale, params.zero, params.minimum, params.inv_scale, aux=(codes,))


def _halves(codes: torch.Tensor) -> np.ndarray:
    """Pack 32 codes into 16 bytes: low nibble code[j], high nibble code[j + 16]."""
    c = codes.numpy().astype(np.uint8)
    return (c[..., :16] & 0x0F) | ((c[..., 16:] & 0x0F) << 4)


def _high_bits(codes: torch.Tensor) -> np.ndarray:
    """Bit 4 of each of the 32 codes, as one little-endian uint32 per block."""
    c = codes.numpy().astype(np.uint32)
    bits = ((c >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=-1).astype("<u4")


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.squeeze(-1).numpy().astype("<f2")


def read_f16(raw: np.ndarray, offset: int) -> torch.Tensor:
    """The fp16 field at byte ``offset`` of each block, as float32 ``(..., 1)``."""
    field = np.ascontiguousarray(raw[..., offset : offset + 2]).view("<f2")
    return torch.from_numpy(field.astype(np.float32))


def read_halves(qs: np.ndarray) -> np.ndarray:
    """Inverse of ``_halves``: 16 bytes -> 32 codes (low nibbles first)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)


def read_high_bits(qh: np.ndarray) -> np.ndarray:
    """Inverse of ``_high_bits``: 4 bytes (a little-endian uint32) -> bit 4 of 32 codes."""
    word = np.ascontiguousarray(qh).view("<u4").astype(np.int64)
    return (((word >> np.arange(32)) & 1) << 4).astype(np.int32)


def _codes_tensor(codes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(codes.astype(np.float32))


def assemble_blocks(parts: list[np.ndarray], rows: int) -> np.ndarray:
    """Concatenate per-block fields (each ``(rows, n_blocks, ...)``, any dtype) into rows of raw bytes."""
    raw = [p.view(np.uint8).reshape(*p.shape[:2], -1) for p in parts]
    return np.concatenate(raw, axis=-1).reshape(rows, -1)


@dataclass(frozen=True)
class Q8_0(GGUFBlockGrid):
    name: str = "Q8_0"
    bits: int = 8
    block_bytes: int = 34

    def reference_fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        d = w.abs().amax(dim=-1, keepdim=True) / 127
        return QuantParams(scale=_fp16_round(d), zero=torch.zeros_like(d), inv_scale=_safe_reciprocal(d))

    def costly_search(self, importance: torch.Tensor | None) -> bool:
        return False  # ggml's Q8_0 ignores an importance matrix: one vector op either way

    def params_from_blocks(self, raw: np.ndarray) -> QuantParams:
        d = read_f16(raw, 0)
        return QuantParams(scale=d, zero=torch.zeros_like(d), aux=(_codes_tensor(raw[..., 2:].view(np.int8)),))

    def encode(self, w: torch.Tensor, params: QuantParams) -> torch.Tensor:
        if params.aux:  # read back from ggml's blocks
            return params.aux[-1].to(torch.int32)
        x = (w * _inv(params)).double()  # product in fp32 as in C, then roundf (half away from zero)
        return (torch.sign(x) * torch.floor(x.abs() + 0.5)).clamp(-128, 127).to(torch.int32)

    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes()
        return assemble_blocks([_f16(qw.params.scale), codes.numpy().astype(np.int8)], codes.shape[0])


def row_weights(w: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """ggml's error weights for the legacy types under an imatrix, for ``w`` shaped ``(rows, blocks, 32)``:
    ``importance * sqrt(sigma2 + w^2)`` with sigma2 the mean square of the whole row (summed in order)."""
    flat = w.reshape(*w.shape[:-2], -1)
    sigma2 = sequential_sum(flat * flat) / torch.tensor(float(flat.shape[-1]))  # a true division, as C's
    return imatrix_weights(w, importance.float().reshape(w.shape[-2:]), sigma2[..., None, None])


def _inv(params: QuantParams) -> torch.Tensor:
    return params.inv_scale if params.inv_scale is not None else _safe_reciprocal(params.scale)


@dataclass(frozen=True)
class _SymmetricBlock(GGUFBlockGrid):
    """Q4_0 / Q5_0: d = signed absmax / -2^(b-1), code = min(2^b - 1, trunc(w / d + 2^(b-1) + 0.5))."""

    uses_importance: bool = True

    def reference_fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        half = 2 ** (self.bits - 1)
        if importance is not None:
            d, codes = make_qx_quants(w.float(), half, row_weights(w.float(), importance))
            d = d[..., None]
            return QuantParams(scale=_fp16_round(d), zero=torch.full_like(d, half), aux=(codes,))
        d = _signed_absmax(w) / -half
        return QuantParams(scale=_fp16_round(d), zero=torch.full_like(d, half), inv_scale=_safe_reciprocal(d))

    def params_from_blocks(self, raw: np.ndarray) -> QuantParams:
        d = read_f16(raw, 0)
        codes = self.read_codes(raw)
        return QuantParams(scale=d, zero=torch.full_like(d, 2 ** (self.bits - 1)), aux=(_codes_tensor(codes),))

    @abstractmethod
    def read_codes(self, raw: np.ndarray) -> np.ndarray:
        """The 32 codes of each block of ``raw``."""

    def encode(self, w: torch.Tensor, params: QuantParams) -> torch.Tensor:
        if params.aux:  # fitted with an importance matrix: the search chose the codes
            return params.aux[-1].to(torch.int32)
        offset = 2 ** (self.bits - 1) + 0.5
        x = w * _inv(params) + offset
        return torch.trunc(x).clamp(0, 2**self.bits - 1).to(torch.int32)


@dataclass(frozen=True)
class _MinBlock(GGUFBlockGrid):
    """Q4_1 / Q5_1: d = (max - min) / (2^b - 1), m = min, code = min(2^b - 1, trunc((w - m) / d + 0.5))."""

    uses_importance: bool = True

    def reference_fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        if importance is not None:
            x = w.float()
            d, the_min, codes = make_qkx2_quants(x, row_weights(x, importance), 2**self.bits - 1, -0.9, 0.05, 36)
            minimum = _fp16_round(-the_min[..., None])  # zero: what GPTQ rounds against once the codes are dropped
            return QuantParams(scale=_fp16_round(d[..., None]), minimum=minimum, zero=minimum, aux=(codes,))
        lo = w.amin(dim=-1, keepdim=True)
        d = (w.amax(dim=-1, keepdim=True) - lo) / (2**self.bits - 1)
        return QuantParams(scale=_fp16_round(d), minimum=_fp16_round(lo), inv_scale=_safe_reciprocal(d),
                           zero=lo)  # zero carries the fp32 minimum the codes are rounded against

    def params_from_blocks(self, raw: np.ndarray) -> QuantParams:
        d, minimum = read_f16(raw, 0), read_f16(raw, 2)
        return QuantParams(scale=d, minimum=minimum, zero=minimum, aux=(_codes_tensor(self.read_codes(raw)),))

    @abstractmethod
    def read_codes(self, raw: np.ndarray) -> np.ndarray:
        """The 32 codes of each block of ``raw``."""

    def encode(self, w: torch.Tensor, params: QuantParams) -> torch.Tensor:
        if params.aux:  # fitted with an importance matrix: the search chose the codes
            return params.aux[-1].to(torch.int32)
        x = (w - params.zero) * _inv(params) + 0.5
        return torch.trunc(x).clamp(0, 2**self.bits - 1).to(torch.int32)

    def decode(self, codes: torch.Tensor, params: QuantParams) -> torch.Tensor:
        return codes.float() * params.scale + params.minimum


@dataclass(frozen=True)
class Q4_0(_SymmetricBlock):
    name: str = "Q4_0"
    bits: int = 4
    block_bytes: int = 18

    def read_codes(self, raw: np.ndarray) -> np.ndarray:
        return read_halves(raw[..., 2:18])

    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes()
        return assemble_blocks([_f16(qw.params.scale), _halves(codes)], codes.shape[0])


@dataclass(frozen=True)
class Q5_0(_SymmetricBlock):
    name: str = "Q5_0"
    bits: int = 5
    block_bytes: int = 22

    def read_codes(self, raw: np.ndarray) -> np.ndarray:
        return read_halves(raw[..., 6:22]) | read_high_bits(raw[..., 2:6])

    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes()
        return assemble_blocks([_f16(qw.params.scale), _high_bits(codes), _halves(codes)], codes.shape[0])


@dataclass(frozen=True)
class Q4_1(_MinBlock):
    name: str = "Q4_1"
    bits: int = 4
    block_bytes: int = 20

    def read_codes(self, raw: np.ndarray) -> np.ndarray:
        return read_halves(raw[..., 4:20])

    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes()
        parts = [_f16(qw.params.scale), _f16(qw.params.minimum), _halves(codes)]
        return assemble_blocks(parts, codes.shape[0])


@dataclass(frozen=True)
class Q5_1(_MinBlock):
    name: str = "Q5_1"
    bits: int = 5
    block_bytes: int = 24

    def read_codes(self, raw: np.ndarray) -> np.ndarray:
        return read_halves(raw[..., 8:24]) | read_high_bits(raw[..., 4:8])

    def to_bytes(self, qw: QuantizedWeight) -> np.ndarray:
        codes = qw.grouped_codes()
        parts = [_f16(qw.params.scale), _f16(qw.params.minimum), _high_bits(codes), _halves(codes)]
        return assemble_blocks(parts, codes.shape[0])
