"""compressed-tensors checkpoints (llm-compressor's format), which vLLM and SGLang read natively and
transformers loads through the ``compressed-tensors`` package.

Schemes (``ct:SCHEME``):

* ``w4a16`` (default) / ``w8a16`` - quantkit's integer codes on the recipe's grid (``--bits`` 4 or 8,
  ``--group-size``, ``--scheme``; any method), format ``pack-quantized``: ``weight_packed`` (codes + 2^(b-1)
  packed densely into int32 along the input dimension), ``weight_scale`` (rows x groups),
  ``weight_zero_point`` for asymmetric grids (packed along the output dimension), ``weight_shape``;
* ``w8a8`` - int8 symmetric per-channel weights (``int-quantized``: ``weight`` int8, ``weight_scale``) and
  int8 activations quantized per token at run time;
* ``fp8`` - FP8 E4M3 weights with per-channel scales (``float-quantized``) and FP8 activations quantized
  per token at run time (llm-compressor's FP8_DYNAMIC); rounded to nearest (FP8 has no calibrated method
  here).

Everything else is stored in the checkpoint's 16-bit type; the config's ``quantization_config`` names the
scheme as llm-compressor writes it (``config_groups``, ``ignore``, ``format``, ``quantization_status``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.grids import PER_CHANNEL, PER_TENSOR, Grid, IntGrid, QuantizedWeight, QuantParams
from quantkit.packing import pack_along_columns, pack_along_rows
from quantkit.recipe import Recipe
from quantkit.targets.base import ExportContext, ExportReport
from quantkit.targets.hf_checkpoint import HFCheckpointTarget, hf_logits, write_quantized_checkpoint

SCHEMES = ("w4a16", "w8a16", "w8a8", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INSTALL_HINT = "pip install 'quantkit[hf]' (compressed-tensors)"


@dataclass(frozen=True)
class FP8Grid(Grid):
    """FP8 E4M3 values with one fp32 scale per output row (absmax / 448): what FP8 W8A8 checkpoints store.
    A code is the FP8 value's bit pattern (0..255), so codes stay integers like every grid's."""

    bits: int = 8
    group_size: int = PER_CHANNEL
    symmetric: bool = True

    @property
    def name(self) -> str:
        return "fp8-e4m3-per-channel"

    def bits_per_weight(self) -> float:
        return 8.0

    def fit(self, groups: torch.Tensor, importance: torch.Tensor | None = None) -> QuantParams:
        scale = (groups.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        return QuantParams(scale=scale.float(), zero=None)

    def encode(self, groups: torch.Tensor, params: QuantParams) -> torch.Tensor:
        return (groups / params.scale).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)

    def decode(self, codes: torch.Tensor, params: QuantParams) -> torch.Tensor:
        return codes.to(torch.uint8).view(torch.float8_e4m3fn).float() * params.scale


def _strategy(grid: IntGrid) -> dict:
    if grid.group_size > 0:
        return {"strategy": "group", "group_size": grid.group_size}
    return {"strategy": "channel", "group_size": None}


def _args(num_bits: int, kind: str, symmetric: bool, **rest) -> dict:
    """One quantization-args entry of config_groups, with every key llm-compressor writes."""
    return {"num_bits": num_bits, "type": kind, "symmetric": symmetric, "dynamic": False, "actorder": None,
            "block_structure": None, "observer": "memoryless_minmax", "observer_kwargs": {}, "group_size": None,
            "strategy": "channel", **rest}


def quantization_config(scheme: str, grid: Grid, ignore: list[str], version: str | None) -> dict:
    if scheme in ("w4a16", "w8a16"):
        weights, activations, fmt = _args(grid.bits, "int", grid.symmetric, **_strategy(grid)), None, "pack-quantized"
    elif scheme == "w8a8":
        weights = _args(8, "int", True)
        activations = _args(8, "int", True, strategy="token", dynamic=True, observer=None)
        fmt = "int-quantized"
    else:
        weights = _args(8, "float", True)
        activations = _args(8, "float", True, strategy="token", dynamic=True, observer=None)
        fmt = "float-quantized"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations,
                                      "output_activations": None, "format": fmt}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": version,
    }


def packed_tensors(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """pack-quantized: signed codes + 2^(b-1) packed along the input dimension."""
    grid = qw.grid
    offset = 2 ** (grid.bits - 1)
    signed = qw.codes.to(torch.int32) if grid.symmetric else qw.codes.to(torch.int32) - offset
    tensors = {
        "weight_packed": pack_along_columns((signed + offset).contiguous(), grid.bits),
        "weight_scale": qw.params.scale[..., 0].to(dtype).contiguous(),
        "weight_shape": torch.tensor(list(qw.shape), dtype=torch.int64),
    }
    if not grid.symmetric:  # zero points in the signed domain, packed along the output dimension
        zeros = qw.params.zero[..., 0].to(torch.int32) - offset
        tensors["weight_zero_point"] = pack_along_rows((zeros + offset).contiguous(), grid.bits)
    return tensors


def int8_tensors(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"weight": qw.codes.to(torch.int8).contiguous(), "weight_scale": qw.params.scale[..., 0].to(dtype)}


def fp8_tensors(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"weight": qw.codes.to(torch.uint8).view(torch.float8_e4m3fn).contiguous(),
            "weight_scale": qw.params.scale[..., 0].to(dtype)}


class CompressedTensorsTarget(HFCheckpointTarget):
    kind = "ct"

    def __init__(self, option: str | None):
        scheme = (option or "w4a16").lower()
        if scheme not in SCHEMES:
            raise QuantkitError(f"unknown ct scheme {option!r}; use one of: {', '.join(SCHEMES)}")
        super().__init__(None)
        self.option = scheme

    def grid(self, recipe: Recipe) -> Grid:
        if self.option == "w8a8":
            return IntGrid(bits=8, group_size=PER_CHANNEL, symmetric=True)
        if self.option == "fp8":
            return FP8Grid()
        return recipe.int_grid()

    def bits_per_weight(self, recipe: Recipe) -> float:
        return self.grid(recipe).bits_per_weight()

    def filename(self) -> str:
        return f"ct-{self.option}"

    def validate(self, ctx: ExportContext) -> None:
        try:
            import compressed_tensors  # noqa: F401 - the runtime check loads the folder through it
        except ImportError:
            raise QuantkitError(f"the ct target needs compressed-tensors; {INSTALL_HINT}") from None
        grid, recipe = self.grid(ctx.recipe), ctx.recipe
        wanted = {"w4a16": 4, "w8a16": 8}.get(self.option)
        if wanted is not None and grid.bits != wanted:
            raise QuantkitError(f"ct:{self.option} stores {wanted}-bit weights; pass --bits {wanted}")
        if grid.group_size == PER_TENSOR:
            raise QuantkitError(f"ct:{self.option}: use --group-size -1 (per channel) or a group size, not 0")
        if recipe.gptq_g_idx:
            raise QuantkitError(f"ct:{self.option} stores groups in column order; use --act-order static")
        if self.option == "fp8" and recipe.method != "rtn":
            raise QuantkitError(f"ct:fp8 rounds to nearest FP8 (as llm-compressor's FP8_DYNAMIC); --method "
                                f"{recipe.method} has no FP8 grid here: use --method rtn")
        if recipe.quantize_embeddings:
            raise QuantkitError(f"ct:{self.option} quantizes linears only; drop --quantize-embeddings")

    def export(self, ctx: ExportContext, path: Path) -> ExportReport:
        grid = self.grid(ctx.recipe)
        dtype = torch.bfloat16 if ctx.source.tensors[ctx.source.arch.embedding].dtype == "BF16" else torch.float16
        pack = {"w8a8": int8_tensors, "fp8": fp8_tensors}.get(self.option, packed_tensors)
        ignore = ["lm_head"] if ctx.source.arch.lm_head not in ctx.quantized_names else []
        version = _version("compressed-tensors")
        notes = () if self.option not in ("w8a8", "fp8") else (
            "activations are quantized per token at run time by a GPU server (vLLM); transformers on a CPU "
            "decompresses the weights and runs 16/32-bit activations, so the check measures the weights",)
        return write_quantized_checkpoint(ctx, path, grid, lambda qw: pack(qw, dtype),
                                          quantization_config(self.option, grid, ignore, version), dtype=dtype,
                                          notes=notes)

    def runtime(self) -> dict:
        versions = {p: _version(p) for p in ("transformers", "compressed-tensors")}
        return {"name": "transformers + compressed-tensors (decompressed on CPU)", "version": versions}

    def logits(self, path: Path, ids: torch.Tensor, progress: bool = True) -> Iterator[np.ndarray]:
        """transformers with compressed-tensors decompressing every weight at load (``run_compressed=False``):
        its compressed CPU modules register zero points unpacked and refuse the packed ones an asymmetric
        ``pack-quantized`` folder stores (seen with compressed-tensors 0.20, transformers 5.24)."""
        from transformers import CompressedTensorsConfig

        return hf_logits(path, ids, progress, quantization_config=CompressedTensorsConfig(run_compressed=False))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
