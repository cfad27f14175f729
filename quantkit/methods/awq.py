"""AWQ: activation-aware scaling (Lin et al., 2023), on any grid.

Per block, for each fold point of the architecture (a norm or linear whose output feeds a set of
linears): measure the mean magnitude of every input channel, try scales s = magnitude^alpha for
``n_grid`` values of alpha in [0, 1), fake-quantize the consumers as Q(W * s) / s, and keep the alpha
whose output of the fold's inspected module (attention for q/k/v, the MLP for gate/up, the linear
itself for o_proj / down_proj, as AutoAWQ scores them) is closest to the unquantized one. The chosen s
is folded away exactly: the producer's output is divided by s and the consumers' inputs multiplied by
s, so the block computes what it did and the inputs captured once stay valid for every fold. Then
each linear's clipping range is searched per group, and the weights are rounded on the grid.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from quantkit.grids import PER_TENSOR, Grid, QuantizedWeight, QuantParams
from quantkit.methods.base import Method, grouped
from quantkit.methods.options import build_config
from quantkit.methods.rtn import RoundToNearest
from quantkit.sequential import MIN_EXPERT_TOKENS, BlockJob, SequentialResult, StopForward, block_output

CLIP_TOKENS = 2048  # tokens scoring clip ratios (embedded model: 512 gave +0.31 % perplexity, 2048 +0.22 %)


@dataclass(frozen=True)
class AWQConfig:
    n_grid: int = field(default=20, metadata={"help": "scales tried per fold (alpha = 0, 1/n, ..., (n-1)/n)"})
    search_rows: int = field(default=8, metadata={
        "help": "calibration sequences the scale search runs each block on (each alpha, each fold)"})
    duo_scaling: bool = field(default=True, metadata={
        "help": "divide the scale by the weight magnitude^(1 - alpha) too (lower KLD on the embedded model)"})
    clip: bool = field(default=True, metadata={"help": "search each group's clipping range"})
    clip_qk: bool = field(default=True, metadata={
        "help": "clip q/k projections too (AutoAWQ skips them; measured lower KLD here)"})
    clip_grid: int = field(default=20, metadata={"help": "clipping ratios tried per group"})
    max_shrink: float = field(default=0.5, metadata={
        "help": "smallest clipping range tried, as (1 - max_shrink) x the group's range"})

    def __post_init__(self) -> None:
        if self.n_grid < 1 or self.clip_grid < 1 or self.search_rows < 1 or not 0 <= self.max_shrink < 1:
            raise ValueError("n_grid, search_rows and clip_grid must be >= 1 and max_shrink in [0, 1)")


def fake_quantize(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    return RoundToNearest().quantize_weight(weight, grid).dequantize()


@torch.no_grad()
def _mean_abs_input(block: nn.Module, consumer: str, job: BlockJob) -> torch.Tensor:
    module = block.get_submodule(consumer)
    total = torch.zeros(module.weight.shape[1], dtype=torch.float64, device=module.weight.device)
    count = [0]

    def hook(_m, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        total.add_(x.abs().sum(0))
        count[0] += x.shape[0]
        raise StopForward  # nothing after the consumer's input is needed

    handle = module.register_forward_pre_hook(hook)
    try:
        for args, kwargs in job.inputs:
            with contextlib.suppress(StopForward):
                block(*args, **kwargs)
    finally:
        handle.remove()
    return (total / max(count[0], 1)).float()


ModuleCalls = list[tuple[tuple, dict, torch.Tensor]]  # (args, kwargs, output) of each call


@torch.no_grad()
def _capture_calls(job: BlockJob, modules: list[str]) -> dict[str, ModuleCalls]:
    """Every call of each named module while the block runs on ``job``'s inputs, with its output."""
    calls: dict[str, ModuleCalls] = {name: [] for name in modules}
    handles = []
    for name in modules:
        def hook(_m, args, kwargs, out, name=name):
            calls[name].append((args, kwargs, block_output(out)))
        handles.append(job.block.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        job.run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


@torch.no_grad()
def _module_error(module: nn.Module, calls: ModuleCalls) -> float:
    return sum(float(((block_output(module(*args, **kwargs)) - ref) ** 2).mean()) for args, kwargs, ref in calls)


def _scale_producer(module: nn.Module, s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide the producer's output channels by s (a norm's weight, or a linear's rows and bias). A norm that
    scales by (offset + weight), as Gemma's do, gets the weight for which that factor is divided by s."""
    if isinstance(module, nn.Linear):
        module.weight.div_(s[:, None])
        if module.bias is not None:
            module.bias.div_(s)
    else:
        module.weight.copy_((module.weight + norm_offset) / s - norm_offset)


@torch.no_grad()
def _mean_abs_weight(weights: list[tuple[torch.Tensor, Grid]]) -> torch.Tensor:
    """Mean magnitude of each input channel's weights, each group (of the weight's grid) normalised by its
    largest magnitude."""
    per_consumer = []
    for w, grid in weights:
        groups = grouped(w.abs(), grid)
        normalised = groups / groups.amax(dim=-1, keepdim=True).clamp(min=1e-8)
        per_consumer.append(normalised.reshape(w.shape))
    return torch.cat(per_consumer).mean(0)


def search_scale(job: BlockJob, consumers: list[str], quantized: list[str], inspect: str, calls: ModuleCalls,
                 config: AWQConfig) -> torch.Tensor:
    """The per-channel scale (from alpha in [0, 1)) whose fake-quantized ``inspect`` output errs least on
    ``calls`` (that module's recorded inputs and unquantized outputs).

    s = x^alpha, or with ``duo_scaling`` s = x^alpha / w^(1 - alpha), where x and w are the mean
    input and (group-normalised) weight magnitudes per input channel.
    """
    magnitude = _mean_abs_input(job.block, consumers[0], job).clamp(min=1e-5)
    originals = {name: job.block.get_submodule(name).weight.detach().clone() for name in quantized}
    w_magnitude = _mean_abs_weight([(w, job.grid_of(n)) for n, w in originals.items()]).clamp(min=1e-5) \
        if config.duo_scaling else None
    best, best_err = torch.ones_like(magnitude), float("inf")
    n_grid = config.n_grid
    try:
        for step in range(n_grid):
            alpha = step / n_grid
            s = magnitude.pow(alpha)
            if w_magnitude is not None:
                s = s / w_magnitude.pow(1 - alpha)
            s = s / (s.max() * s.min()).sqrt()
            for name, w in originals.items():
                job.block.get_submodule(name).weight.copy_(fake_quantize(w * s, job.grid_of(name)) / s)
            err = _module_error(job.block.get_submodule(inspect), calls)
            if err < best_err:
                best, best_err = s, err
    finally:
        for name, w in originals.items():
            job.block.get_submodule(name).weight.copy_(w)
    return best


def _fold(job: BlockJob, producer: str, consumers: list[str], s: torch.Tensor) -> None:
    _scale_producer(job.block.get_submodule(producer), s, job.arch.norm_offset)
    for name in consumers:
        job.block.get_submodule(name).weight.mul_(s)


def _fold_applies(block: nn.Module, producer: str, consumers: list[str]) -> bool:
    """A linear producer must emit exactly the consumers' inputs (not so for v_proj -> o_proj with GQA)."""
    module = block.get_submodule(producer)
    width = block.get_submodule(consumers[0]).weight.shape[1]  # a linear's or a router's input width
    if isinstance(module, nn.Linear):
        return module.out_features == width
    return getattr(module, "weight", None) is not None and module.weight.shape == (width,)


@torch.no_grad()
def clipped_params(weight: torch.Tensor, x: torch.Tensor, grid: Grid, config: AWQConfig) -> QuantParams:
    """Per (row, group) clipping ratio minimising ||x (w - Q(w))^T||^2; returns the grid's parameters.

    The error is scored through each group's input Gram matrix, d^T (X^T X) d, so the cost does not
    grow with the number of tokens."""
    groups = grouped(weight, grid)  # (rows, n_groups, g)
    rows, n_groups, size = groups.shape
    xg = x.reshape(x.shape[0], n_groups, size).transpose(0, 1)  # (n_groups, tokens, g)
    gram = xg.transpose(1, 2) @ xg  # (n_groups, g, g)
    best_ratio = torch.ones(rows, n_groups, 1, device=weight.device)
    best_err = torch.full((rows, n_groups), float("inf"), device=weight.device)
    for step in range(config.clip_grid):
        ratio = 1.0 - config.max_shrink * step / config.clip_grid
        params = grid.fit(groups * ratio)
        diff = groups - grid.decode(grid.encode(groups, params), params)
        err = (torch.einsum("rng,ngh->rnh", diff, gram) * diff).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio[better] = ratio
    return grid.fit(groups * best_ratio)


class AWQ(Method):
    name = "awq"
    needs_statistics = True
    sequential = True

    config_class = AWQConfig

    def __init__(self, config: AWQConfig | None = None):
        self.config = config or AWQConfig()

    @classmethod
    def from_recipe(cls, recipe) -> AWQ:
        return cls(build_config(cls.name, AWQConfig, {}, recipe.parsed_method_options()))

    def quantize_weight(self, weight: torch.Tensor, grid: Grid, stats: object | None = None) -> QuantizedWeight:
        """Rounding on the grid after scaling; the scale search itself needs a block (quantize_block)."""
        return RoundToNearest().quantize_weight(weight, grid)

    def _clips(self, name: str, grid: Grid) -> bool:
        """Whether ``name``'s clipping range is searched: grids that round any weights on fitted parameters
        (k-quants' fits choose their own codes), group-wise, and q/k only when ``clip_qk``."""
        wanted = self.config.clip and (self.config.clip_qk or not name.endswith(("q_proj", "k_proj")))
        return wanted and grid.group_size != PER_TENSOR and grid.column_encodable

    @torch.no_grad()
    def quantize_block(self, job: BlockJob) -> SequentialResult:
        result = SequentialResult()
        folds = [fold for fold in job.arch.fold_points if any(c in job.members for c in fold.consumers)
                 and _fold_applies(job.block, fold.producer, list(fold.consumers))]
        search = replace(job, inputs=job.inputs[: self.config.search_rows])
        calls = _capture_calls(search, sorted({fold.inspect for fold in folds}))
        for fold in [f for f in folds if _expert_too_rare(job, f.inspect, calls[f.inspect])]:
            folds.remove(fold)  # an expert too few tokens reach keeps its scale: nothing to measure it on
        for fold in folds:
            consumers = list(fold.consumers)
            quantized = [c for c in consumers if c in job.members]
            s = search_scale(search, consumers, quantized, fold.inspect, calls[fold.inspect], self.config)
            _fold(job, fold.producer, consumers, s)
            # a norm and unquantized consumers (a router): their rescaled weights go into the artifact
            for name in [fold.producer, *consumers]:
                if name not in job.members:
                    result.replaced[f"{name}.weight"] = job.block.get_submodule(name).weight.clone()
        clipped = [name for name in job.members if self._clips(name, job.grid_of(name))]
        inputs = _capture_inputs(job, clipped) if clipped else {}
        for name in [n for n in clipped if _expert_too_rare(job, n, inputs[n])]:
            clipped.remove(name)  # its clip would fit a handful of tokens: it is rounded on the full range
        for name in job.members:
            module = job.block.get_submodule(name)
            weight = module.weight.detach().float()
            grid = job.grid_of(name)
            if name in clipped:
                params = clipped_params(weight, inputs[name], grid, self.config)
                codes = grid.encode(grouped(weight, grid), params).reshape(weight.shape)
                qw = QuantizedWeight(codes=codes, params=params, grid=grid)
            else:
                qw = self.quantize_weight(weight, grid)
            module.weight.copy_(qw.dequantize().to(module.weight.dtype))
            result.quantized[name] = qw
        return result


def _expert_too_rare(job: BlockJob, name: str, seen: ModuleCalls | torch.Tensor) -> bool:
    """Whether ``name`` is an expert's linear that saw fewer than MIN_EXPERT_TOKENS calibration tokens (then
    listed in ``job.fallbacks``); ``seen`` holds its recorded calls or its captured input rows."""
    expert = job.arch.expert_of(name)
    if expert is None:
        return False
    tokens = seen.shape[0] if isinstance(seen, torch.Tensor) else sum(o.reshape(-1, o.shape[-1]).shape[0]
                                                                       for _, _, o in seen)
    if tokens >= MIN_EXPERT_TOKENS:
        return False
    job.fallbacks.add(expert)
    return True


@torch.no_grad()
def _capture_inputs(job: BlockJob, names: list[str]) -> dict[str, torch.Tensor]:
    """CLIP_TOKENS input rows of each named linear, spread evenly over all calibration sequences
    (the first sequence alone measured a worse clip: AWQ +0.53 % perplexity vs +0.17 % spread)."""
    per_sequence = -(-CLIP_TOKENS // len(job.inputs))
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    for name in names:
        def hook(_m, args, _out, name=name):
            x = args[0].reshape(-1, args[0].shape[-1])
            picks = torch.linspace(0, x.shape[0] - 1, min(per_sequence, x.shape[0]), device=x.device).long()
            captured[name].append(x[picks].float())
        handles.append(job.block.get_submodule(name).register_forward_hook(hook))
    try:
        for args, kwargs in job.inputs:
            block_output(job.block(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(rows)[:CLIP_TOKENS] if rows else torch.zeros(0, job.block.get_submodule(name).in_features)
            for name, rows in captured.items()}
