"""Layer-by-layer quantization for methods that learn from activations (GPTQ).

capture the first block's inputs -> for each block: for each group of linears that read the same
input, in execution order: collect input statistics with hooks, quantize, write the dequantized
weights back -> re-run the block to produce the next block's inputs. Later layers therefore see
the error of earlier ones. Which modules exist and in what order comes from the architecture's data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from quantkit.arch import Architecture
from quantkit.calibrate import LinearStats
from quantkit.grids import Grid, QuantizedWeight


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    """Positional and keyword arguments the first block receives, one entry per calibration row."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in ids:
            with contextlib.suppress(_StopForward):
                model(input_ids=row[None], use_cache=False)
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def _group_statistics(block: nn.Module, names: list[str], inputs: list[tuple[tuple, dict]]) -> dict[str, LinearStats]:
    stats: dict[str, LinearStats] = {}
    handles = []
    for name in names:
        module = block.get_submodule(name)
        entry = stats[name] = LinearStats(torch.zeros(module.in_features, module.in_features, dtype=torch.float64))
        handles.append(module.register_forward_hook(lambda _m, args, _o, entry=entry: entry.add(args[0])))
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return stats


QuantizeFn = Callable[[torch.Tensor, Grid, LinearStats], QuantizedWeight]


@torch.no_grad()
def quantize_sequential(model: nn.Module, arch: Architecture, calib_ids: torch.Tensor, names: Iterable[str],
                        grid: Grid, quantize: QuantizeFn, progress: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize the block linears listed in ``names`` on ``grid``; ``model`` is modified in place."""
    wanted = set(names)
    blocks = model.get_submodule(arch.blocks_module)
    inputs = capture_block_inputs(model, blocks[0], calib_ids)
    results: dict[str, QuantizedWeight] = {}
    for index, block in enumerate(tqdm(blocks, desc=f"gptq {grid.name}", unit="block", disable=not progress,
                                       leave=False)):
        prefix = arch.block(index)
        for group in arch.linear_groups:
            members = [n for n in group if f"{prefix}{n}.weight" in wanted]
            if not members:
                continue
            stats = _group_statistics(block, members, inputs)
            for name in members:
                module = block.get_submodule(name)
                qw = quantize(module.weight.detach().float(), grid, stats[name])
                module.weight.copy_(qw.dequantize().to(module.weight.dtype))
                results[f"{prefix}{name}.weight"] = qw
        inputs = [((_block_output(block(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
    return results
