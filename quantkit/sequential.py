"""Layer-by-layer quantization for methods that learn from activations (GPTQ, AWQ).

capture the first block's inputs -> for each block: the method quantizes the block's linears from
the inputs that block actually receives (and may rescale float tensors, as AWQ does) -> re-run the
block with its quantized weights to produce the next block's inputs. Later layers therefore see the
error of earlier ones. Which modules exist and in what order comes from the architecture's data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from quantkit.arch import Architecture
from quantkit.calibrate import LinearStats
from quantkit.grids import Grid, QuantizedWeight
from quantkit.resume import PassCheckpoint

BlockInputs = list[tuple[tuple, dict]]  # the (args, kwargs) of one block call per calibration row


@dataclass(frozen=True)
class GridPlan:
    """Which grid each block linear is quantized on: ``default`` unless ``overrides`` (full weight name
    -> grid) names another, as llama.cpp's file types put some attn_v / ffn_down in more bits.
    Hashable, so every target with the same plan shares one layer-by-layer pass."""

    default: Grid
    overrides: tuple[tuple[str, Grid], ...] = ()

    @property
    def name(self) -> str:
        others = sorted({g.name for _, g in self.overrides} - {self.default.name})
        return "+".join([self.default.name, *others])

    def grid_for(self, name: str) -> Grid:
        return dict(self.overrides).get(name, self.default)


class StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class BlockJob:
    """One block to quantize: the module, its tensor-name prefix, and what the method needs."""

    block: nn.Module
    prefix: str  # e.g. "model.layers.3."
    arch: Architecture
    members: list[str]  # block-relative names of the linears to quantize, in execution order
    inputs: BlockInputs
    grid: Grid  # the block's grid; a linear of ``grids`` is quantized on its own
    grids: dict[str, Grid] = field(default_factory=dict)  # block-relative linear name -> grid
    fallbacks: set[int] = field(default_factory=set)  # experts calibrated on all tokens (too few routed)

    def grid_of(self, name: str) -> Grid:
        return self.grids.get(name, self.grid)

    @torch.no_grad()
    def run(self) -> list[torch.Tensor]:
        return [block_output(self.block(*args, **kwargs)) for args, kwargs in self.inputs]


@dataclass
class SequentialResult:
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    # Float tensors the method rescaled (AWQ folds scales into norms): full name -> new value.
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    # block index -> experts that saw fewer than MIN_EXPERT_TOKENS calibration tokens (see group_statistics)
    expert_fallbacks: dict[int, list[int]] = field(default_factory=dict)


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def same_kwargs(a: dict, b: dict) -> bool:
    """Whether two calls' keyword arguments hold equal values (tensors compared by value)."""
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, torch.Tensor) or isinstance(other, torch.Tensor):
            if not (isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value.shape == other.shape
                    and value.device == other.device and torch.equal(value, other)):
                return False
        elif isinstance(value, tuple) and isinstance(other, tuple):
            if not same_kwargs(dict(enumerate(value)), dict(enumerate(other))):
                return False
        elif value is not other and value != other:
            return False
    return True


@dataclass
class BlockCalls:
    """What the blocks of a model receive for each token row: the first block's input (hidden states) and
    every block's keyword arguments. Blocks of one model can get different ones (Gemma's sliding-window
    and global layers: other masks, other rope tables), so each block keeps its own; equal ones are shared
    between rows and blocks, so they cost little memory."""

    first_inputs: list[torch.Tensor]
    kwargs: list[list[dict]]  # kwargs[row][block]

    def inputs(self, block: int, hidden: list[torch.Tensor]) -> BlockInputs:
        return [((h,), self.kwargs[row][block]) for row, h in enumerate(hidden)]


@torch.no_grad()
def capture_block_calls(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor,
                        keep_first_input=None) -> BlockCalls:
    """Run each row of ``ids`` through ``model`` with every block answering with its own input (no block
    computes, so blocks may sit on the meta device) and record what each block receives.

    ``keep_first_input(row, hidden)``, if given, takes each row's first-block input instead of the result
    (e.g. to put it in a scratch file)."""
    calls = BlockCalls([], [])
    current: dict[int, dict] = {}
    last = len(blocks) - 1

    def recorder(index: int):
        def forward(hidden, *args, **kwargs):
            if args:
                raise RuntimeError(f"block {index} took {len(args) + 1} positional arguments; expected the hidden "
                                   "states alone")
            current[index] = kwargs
            if index == 0:
                if keep_first_input is None:
                    calls.first_inputs.append(hidden)
                else:
                    keep_first_input(len(calls.kwargs), hidden)
            if index == last:
                raise StopForward
            return hidden
        return forward

    for index, block in enumerate(blocks):
        block.forward = recorder(index)  # an instance attribute: module hooks still run around it
    try:
        for row in ids:
            with contextlib.suppress(StopForward):
                model(input_ids=row[None].to(_device(model)), use_cache=False)
            calls.kwargs.append([_shared(calls.kwargs, index, current[index]) for index in range(len(blocks))])
    finally:
        for block in blocks:
            del block.forward
    return calls


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def _shared(earlier: list[list[dict]], index: int, kwargs: dict) -> dict:
    """``kwargs``, or the previous row's equal dict for the same block (rows of one length get the same
    masks and rope tables; within a row the model already passes the same objects to blocks of one kind)."""
    if earlier and same_kwargs(earlier[-1][index], kwargs):
        return earlier[-1][index]
    return kwargs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> BlockInputs:
    """The first block's positional and keyword arguments, one entry per row."""
    calls = capture_block_calls(model, blocks, ids)
    return calls.inputs(0, calls.first_inputs)


@torch.no_grad()
def shared_input_statistics(block: nn.Module, names: list[str], inputs: BlockInputs) -> LinearStats:
    """``X^T X`` of the input that the named linears share (one group of ``Architecture.linear_groups``).

    The hook sits on the first of them and stops the block's forward right there: nothing after
    the group's input is needed, so each statistics pass costs only the part of the block before it.
    """
    first = block.get_submodule(names[0])
    stats = LinearStats.empty(first.in_features, first.weight.device)

    def hook(_module, args):
        stats.add(args[0])
        raise StopForward

    handle = first.register_forward_pre_hook(hook)
    try:
        for args, kwargs in inputs:
            with contextlib.suppress(StopForward):
                block(*args, **kwargs)
    finally:
        handle.remove()
    return stats


QuantizeFn = Callable[[torch.Tensor, Grid, LinearStats], QuantizedWeight]


# An expert the router sends fewer calibration tokens than this is calibrated on every token of its block
# instead: a Hessian from a handful of tokens fits those tokens, not the expert's inputs at large.
MIN_EXPERT_TOKENS = 64


@torch.no_grad()
def group_statistics(job: BlockJob, members: list[str]) -> LinearStats:
    """``shared_input_statistics`` for one group of linears; an expert's group that too few calibration
    tokens reach (``MIN_EXPERT_TOKENS``) is measured on every token of the block, and listed in
    ``job.fallbacks``."""
    stats = shared_input_statistics(job.block, members, job.inputs)
    expert = job.arch.expert_of(members[0])
    if expert is None or stats.tokens >= MIN_EXPERT_TOKENS:
        return stats
    from quantkit.arch.moe import all_tokens_to

    job.fallbacks.add(expert)
    with all_tokens_to(job.block, job.arch, expert):
        return shared_input_statistics(job.block, members, job.inputs)


@torch.no_grad()
def quantize_linear_by_linear(job: BlockJob, quantize: QuantizeFn) -> dict[str, QuantizedWeight]:
    """Per-linear methods (GPTQ): for each group of linears reading the same input, in execution
    order, collect statistics (after the previous groups were quantized), quantize, write back."""
    results = {}
    for group in job.arch.linear_groups:
        members = [n for n in group if n in job.members]
        if not members:
            continue
        stats = group_statistics(job, members)
        for name in members:
            module = job.block.get_submodule(name)
            qw = quantize(module.weight.detach().float(), job.grid_of(name), stats)
            module.weight.copy_(qw.dequantize().to(module.weight.dtype))
            results[name] = qw
    return results


BlockFn = Callable[[BlockJob], SequentialResult]


@torch.no_grad()
def quantize_sequential(model: nn.Module, arch: Architecture, calib_ids: torch.Tensor, names: Iterable[str],
                        grid: Grid | GridPlan, quantize_block: BlockFn, progress: bool = False,
                        label: str = "quantize", streamer=None,
                        on_block: Callable[[int, int], None] | None = None,
                        checkpoint: PassCheckpoint | None = None) -> SequentialResult:
    """Quantize the block linears listed in ``names`` on ``grid`` (or each on its grid of a
    ``GridPlan``); ``model`` is modified in place.

    ``quantize_block`` gets each block with the inputs it receives from the already-quantized blocks
    before it, must leave the block holding its dequantized weights, and returns block-relative names.
    With a ``streamer`` (quantkit.streaming.BlockStreamer) each block is read from the checkpoint just
    before its turn and dropped after it, so one block is in memory at a time. With a ``checkpoint``
    each finished block is saved, and a pass that finds saved blocks continues after the last of them.
    """
    wanted = set(names)
    plan = grid if isinstance(grid, GridPlan) else GridPlan(grid)
    blocks = model.get_submodule(arch.blocks_module)
    calls = capture_block_calls(model, blocks, calib_ids)
    hidden = calls.first_inputs
    result = SequentialResult()
    start = 0
    if checkpoint is not None and checkpoint.last_finished() >= 0:
        done, hidden = checkpoint.load(checkpoint.last_finished())
        for index, saved in enumerate(done):
            _merge(result, index, saved)
        start = len(done)
    for index in tqdm(range(start, len(blocks)), desc=f"{label} {plan.name}", unit="block", disable=not progress,
                      leave=False, initial=start, total=len(blocks)):
        block = streamer.load_block(index) if streamer else blocks[index]
        prefix = arch.block(index)
        members = [n for n in arch.linears if f"{prefix}{n}.weight" in wanted]
        grids = {n: plan.grid_for(f"{prefix}{n}.weight") for n in members}
        job = BlockJob(block, prefix, arch, members, calls.inputs(index, hidden), plan.default,
                       {n: g for n, g in grids.items() if g != plan.default})
        block_result = quantize_block(job)
        # narrow codes while the rest of the model is quantized: int32 would hold 4 bytes per weight
        saved = {"quantized": {f"{prefix}{n}.weight": qw.to("cpu").compact()
                               for n, qw in block_result.quantized.items()},
                 "replaced": {f"{prefix}{n}": t.to("cpu") for n, t in block_result.replaced.items()},
                 "fallbacks": sorted(job.fallbacks)}
        _merge(result, index, saved)
        hidden = job.run()
        if streamer:
            streamer.release_block(index)
        if checkpoint is not None:
            checkpoint.save(index, saved, hidden)
        if on_block:
            on_block(index, len(blocks))
    return result


def _merge(result: SequentialResult, index: int, block: dict) -> None:
    """Add one block's results (as ``quantize_sequential`` saves them) to the pass's."""
    result.quantized.update(block["quantized"])
    result.replaced.update(block["replaced"])
    if block["fallbacks"]:
        result.expert_fallbacks[index] = block["fallbacks"]
