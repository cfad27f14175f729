"""Plain integer grids: absmax (symmetric) and zero-point (asymmetric), 2-8 bits.

absmax:     scale = max|w| / (2^(b-1) - 1/2), code = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1)
            (all 2^b codes in use; the largest magnitude lands half a step from a code, as in GPTQ's
            symmetric grid)
zero-point: scale = (max - min) / (2^b - 1) with the range stretched to include 0,
            zero = round(-min / scale),      code = clamp(round(w / scale) + zero, 0, 2^b - 1)
Rounding is half-to-even (torch.round). An all-zero group gets scale 1 so it decodes to zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.grids.base import PER_CHANNEL, PER_TENSOR, Grid, QuantParams


@dataclass(frozen=True)
class IntGrid(Grid):
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    # Checkpoint formats store scales in fp16: fitting on fp16-rounded scales makes the stored weight
    # decode exactly as the in-memory one.
    fp16_scales: bool = False
    # GPTQ v1 checkpoints store zero - 1 in an unsigned field, so a zero point of 0 cannot be stored.
    min_zero: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size < PER_CHANNEL:
            raise ValueError(f"group size must be positive, -1 (per channel) or 0 (per tensor), got {self.group_size}")

    @property
    def name(self) -> str:
        scheme = "sym" if self.symmetric else "asym"
        group = {PER_TENSOR: "tensor", PER_CHANNEL: "channel"}.get(self.group_size, f"g{self.group_size}")
        return f"int{self.bits}-{scheme}-{group}"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        if self.symmetric:
            scale = self._storable(w.abs().amax(dim=-1, keepdim=True) / (self.qmax + 0.5))
            return QuantParams(scale=scale)
        lo = w.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = w.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = self._storable((hi - lo) / self.qmax)
        zero = torch.round(-lo / scale).clamp(self.min_zero, self.qmax)
        return QuantParams(scale=scale, zero=zero)

    def stored_scale_dtype(self) -> torch.dtype | None:
        """The type the artifact stores scales in, when narrower than fp32: scales are fitted on its values, so the
        stored weight decodes exactly as the in-memory one."""
        return torch.float16 if self.fp16_scales else None

    def _storable(self, scale: torch.Tensor) -> torch.Tensor:
        dtype = self.stored_scale_dtype()
        if dtype == torch.float16:
            scale = scale.clamp(max=65504.0)
        if dtype is not None:
            scale = scale.to(dtype).float()
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def encode(self, w: torch.Tensor, params: QuantParams) -> torch.Tensor:
        q = torch.round(w / params.scale)
        if params.zero is not None:
            q = q + params.zero
        return q.clamp(self.qmin, self.qmax).to(torch.int32)

    def bits_per_weight(self) -> float:
        if self.group_size <= 0:
            return float(self.bits)
        return self.bits + (16 if self.symmetric else 16 + self.bits) / self.group_size
