"""Grids: how a group of weights maps to integers.

A grid fits per-group parameters (scale, zero point or minimum) and rounds weights to integer
codes on them. A *method* (round-to-nearest, later GPTQ/AWQ) decides which codes to use; the grid
only says what codes mean. All functions work on tensors shaped ``(..., group)``: the leading
dimensions are independent groups, so one call handles a whole weight matrix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

PER_TENSOR = 0
PER_CHANNEL = -1


@dataclass
class QuantParams:
    """Per-group parameters, each shaped ``(..., 1)`` to broadcast over a group.

    Decoding is ``(code - zero) * scale`` or, when ``minimum`` is set, ``code * scale + minimum``.
    ``inv_scale``, when set, is the reciprocal a grid rounds with: ggml's quantizers divide by the
    fp32 scale although they store it as fp16, and bit-exact output has to do the same.
    """

    scale: torch.Tensor
    zero: torch.Tensor | None = None
    minimum: torch.Tensor | None = None
    inv_scale: torch.Tensor | None = None
    # Grid-specific tensors shaped (rows, groups, ...) that a format stores (k-quants' super-block
    # scales and integer sub-block scales); carried along by ``map`` so row permutations keep them.
    aux: tuple[torch.Tensor, ...] = ()

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.scale, self.zero, self.minimum, self.inv_scale)

    def map(self, fn) -> QuantParams:
        return QuantParams(*(None if t is None else fn(t) for t in self._tensors()),
                           aux=tuple(fn(t) for t in self.aux))

    def where(self, cond: torch.Tensor, other: QuantParams) -> QuantParams:
        """``other``'s parameters where ``cond`` (shaped like the leading dims) holds, else these."""
        def pick(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            return torch.where(cond.reshape(*cond.shape, *[1] * (mine.ndim - cond.ndim)), theirs, mine)

        pairs = zip(self._tensors(), other._tensors(), strict=True)
        return QuantParams(*(None if a is None else pick(a, b) for a, b in pairs),
                           aux=tuple(pick(a, b) for a, b in zip(self.aux, other.aux, strict=True)))

    @staticmethod
    def stack(params: list[QuantParams], dim: int) -> QuantParams:
        """Per-group parameters fitted one group at a time, stacked along ``dim``."""
        columns = zip(*(p._tensors() for p in params), strict=True)
        return QuantParams(*(None if ts[0] is None else torch.stack(ts, dim=dim) for ts in columns),
                           aux=tuple(torch.stack(ts, dim=dim) for ts in zip(*(p.aux for p in params), strict=True)))


class Grid(ABC):
    """A quantization grid. ``group_size`` counts consecutive weights along a row (input dim)."""

    name: str
    bits: int
    group_size: int
    # Formats whose blocks are consecutive weights (GGUF) cannot store act-order's column groups.
    contiguous_groups_only: bool = False
    # Whether ``encode`` rounds any weights on a group's fitted parameters (AWQ's clip search needs
    # that); k-quants answer with the codes their fit chose, and round a column only on
    # ``column_params`` (what GPTQ uses).
    column_encodable: bool = True
    # Whether ``fit`` weighs errors by a per-column importance (llama.cpp's imatrix), so that
    # collecting one is worth a calibration pass.
    uses_importance: bool = False

    @abstractmethod
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        """Parameters for each group of ``w`` (shape ``(..., group)``).

        ``importance``: how much each input column's error counts (llama.cpp's importance matrix: the
        mean squared activation of that column), shaped like ``w``'s trailing ``(n_groups, group)``,
        with ``w`` holding whole rows ``(rows, n_groups, group)``. Grids with an importance-weighted
        search (GGUF's) use it; the others ignore it.
        """

    @abstractmethod
    def encode(self, w: torch.Tensor, params: QuantParams) -> torch.Tensor:
        """Integer codes (int32) of ``w`` on the fitted parameters."""

    def decode(self, codes: torch.Tensor, params: QuantParams) -> torch.Tensor:
        q = codes.float()
        if params.minimum is not None:
            return q * params.scale + params.minimum
        zero = params.zero if params.zero is not None else 0.0
        return (q - zero) * params.scale

    def column_params(self, params: QuantParams, offset: int) -> QuantParams:
        """The parameters that round and decode column ``offset`` of one group on their own (GPTQ).

        ``params`` are one group's (each ``(rows, ...)``). Plain grids use the same ones for every
        column; k-quants pick the column's sub-block scale and drop the codes their fit chose.
        """
        return params

    def with_codes(self, params: QuantParams, codes: torch.Tensor) -> QuantParams:
        """``params`` carrying ``codes`` ``(rows, n_groups, group)`` instead of any codes the fit chose,
        so that ``encode(w, params)`` keeps answering with the codes actually stored."""
        return params

    def group_for(self, row_length: int) -> int:
        """The number of weights per group for rows of ``row_length`` (per-tensor counts as rows)."""
        if self.group_size in (PER_TENSOR, PER_CHANNEL):
            return row_length
        return self.group_size

    def check_shape(self, name: str, shape: tuple[int, ...]) -> str | None:
        """A reason this grid cannot quantize a tensor of ``shape``, or None."""
        if len(shape) != 2:
            return f"{name} is not a matrix"
        if self.group_size > 0 and shape[1] % self.group_size:
            return f"group size {self.group_size} does not divide the row length {shape[1]} of {name}"
        return None

    def bits_per_weight(self) -> float:
        """Storage cost including per-group parameters (fp16 scale and zero/min)."""
        if self.group_size <= 0:
            return float(self.bits)
        return self.bits + 32 / self.group_size


@dataclass
class QuantizedWeight:
    """A quantized matrix: codes ``(rows, cols)`` and parameters ``(rows, n_groups, 1)``.

    Groups are consecutive columns unless ``g_idx`` (the group of each column, as GPTQ's act-order
    produces) is set.
    """

    codes: torch.Tensor
    params: QuantParams
    grid: Grid
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def grouped_codes(self) -> torch.Tensor:
        if self.g_idx is not None:
            raise ValueError("this weight's groups are not consecutive columns (act-order); use dequantize()")
        rows, cols = self.codes.shape
        n_groups = self.params.scale.shape[-2]
        return self.codes.view(rows, n_groups, cols // n_groups)

    def dequantize(self) -> torch.Tensor:
        if self.g_idx is not None:
            per_column = self.params.map(lambda t: t[:, self.g_idx, :])
            return self.grid.decode(self.codes[..., None], per_column).squeeze(-1)
        return self.grid.decode(self.grouped_codes(), self.params).reshape(self.codes.shape)

    def compact(self) -> QuantizedWeight:
        """The same weight with its codes in the narrowest integer type that holds them (int8, uint8 or int16
        instead of int32): a layer-by-layer pass keeps every quantized weight until the artifact is written."""
        low, high = int(self.codes.min()), int(self.codes.max())
        for dtype in (torch.int8, torch.uint8, torch.int16):
            info = torch.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return QuantizedWeight(self.codes.to(dtype), self.params, self.grid, self.g_idx)
        return self

    def widened(self) -> QuantizedWeight:
        """Codes back in int32, the type every consumer computes with (``compact`` undone)."""
        if self.codes.dtype == torch.int32:
            return self
        return QuantizedWeight(self.codes.to(torch.int32), self.params, self.grid, self.g_idx)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        g_idx = None if self.g_idx is None else self.g_idx.to(device)
        return QuantizedWeight(self.codes.to(device), self.params.map(lambda t: t.to(device)), self.grid, g_idx)

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Rows ``start:stop`` of this weight (row-wise parameters sliced along)."""
        if self.params.scale.shape[0] == 1:  # per-tensor parameters apply to every row
            return QuantizedWeight(self.codes[start:stop], self.params, self.grid, self.g_idx)
        return QuantizedWeight(self.codes[start:stop], self.params.map(lambda t: t[start:stop]), self.grid, self.g_idx)

    def permute_rows(self, order: torch.Tensor) -> QuantizedWeight:
        """The same weight with its output rows reordered (e.g. llama.cpp's rope layout)."""
        if self.params.scale.shape[0] == 1:  # per-tensor parameters apply to every row
            return QuantizedWeight(self.codes[order], self.params, self.grid, self.g_idx)
        return QuantizedWeight(self.codes[order], self.params.map(lambda t: t[order]), self.grid, self.g_idx)
