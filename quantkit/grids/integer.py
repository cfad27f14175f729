"""Plain integer grids: absmax (symmetric) and zero-point (asymmetric), 2-8 bits.

absmax:     scale = max|w| / (2^(b-1) - 1),  code = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1)
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

    def fit(self, w: torch.Tensor) -> QuantParams:
        if self.symmetric:
            scale = w.abs().amax(dim=-1, keepdim=True) / self.qmax
            return QuantParams(scale=torch.where(scale > 0, scale, torch.ones_like(scale)))
        lo = w.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = w.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / self.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, self.qmax)
        return QuantParams(scale=scale, zero=zero)

    def encode(self, w: torch.Tensor, params: QuantParams) -> torch.Tensor:
        q = torch.round(w / params.scale)
        if params.zero is not None:
            q = q + params.zero
        return q.clamp(self.qmin, self.qmax).to(torch.int32)

    def bits_per_weight(self) -> float:
        if self.group_size <= 0:
            return float(self.bits)
        return self.bits + (16 if self.symmetric else 16 + self.bits) / self.group_size
