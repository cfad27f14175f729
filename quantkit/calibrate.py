"""Calibration statistics of linear-layer inputs, collected once per run.

For each quantized linear: the sum of outer products of its inputs (``X^T X``, GPTQ's Hessian up
to a factor) and the token count; the diagonal over the count is the mean squared activation per
input channel (llama.cpp's importance matrix, AWQ's activation magnitude). One forward pass over
the calibration samples serves every grid and every target of a run. When only the importance
matrix is needed (``gram=False``) just the per-channel sums of squares are kept: n numbers, not n^2.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from quantkit.data import TokenSamples


@dataclass
class LinearStats:
    gram: torch.Tensor | None  # (in_features, in_features) float64: sum over tokens of x x^T; None: diagonal only
    tokens: int = 0
    squares: torch.Tensor | None = None  # (in_features,) float64 sum of x_j^2, kept when there is no gram

    @classmethod
    def empty(cls, features: int, device: torch.device | str = "cpu", gram: bool = True) -> LinearStats:
        if gram:
            return cls(torch.zeros(features, features, dtype=torch.float64, device=device))
        # an importance matrix needs only the diagonal: in_features numbers instead of in_features^2
        return cls(None, squares=torch.zeros(features, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.gram is not None:
            # one sequence's products in fp32 (fast), summed across sequences in fp64 (no drift)
            self.gram += (x.T @ x).double()
        if self.squares is not None:
            self.squares += (x.double() ** 2).sum(0)
        self.tokens += x.shape[0]

    @property
    def sum_squares(self) -> torch.Tensor:
        """Sum of x_j^2 over calibration tokens, per input channel j."""
        return self.squares if self.squares is not None else torch.diagonal(self.gram)

    @property
    def mean_square(self) -> torch.Tensor:
        """Mean of x_j^2 over calibration tokens, per input channel j."""
        return self.sum_squares / max(self.tokens, 1)


def _module_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


@torch.no_grad()
def collect_statistics(model: nn.Module, samples: TokenSamples, weight_names: Iterable[str],
                       progress: bool = False, gram: bool = True) -> dict[str, LinearStats]:
    """Run the calibration samples through ``model`` and accumulate each named linear's input stats
    (``gram=False``: only the per-channel sums of squares, all an importance matrix needs)."""
    modules = dict(model.named_modules())
    stats: dict[str, LinearStats] = {}
    handles = []
    for name in weight_names:
        module = modules[_module_name(name)]
        if not isinstance(module, nn.Linear):
            continue  # embeddings take token ids, not activations
        entry = stats[name] = LinearStats.empty(module.in_features, module.weight.device, gram)
        handles.append(module.register_forward_hook(lambda _m, args, _out, entry=entry: entry.add(args[0])))
    try:
        for row in tqdm(samples.ids, desc="calibrate", unit="seq", disable=not progress, leave=False):
            model(input_ids=row[None])
    finally:
        for handle in handles:
            handle.remove()
    return stats


@torch.no_grad()
def collect_statistics_streamed(source, samples: TokenSamples, weight_names: Iterable[str], progress: bool = False,
                                gram: bool = True) -> dict[str, LinearStats]:
    """``collect_statistics`` one decoder block in memory at a time (the unquantized model's activations
    flow through; the output matrix's input is the final normed hidden state)."""
    from quantkit.streaming import ActivationStore, BlockStreamer, run_blocks

    wanted = set(weight_names)
    arch = source.arch
    stats: dict[str, LinearStats] = {}

    def on_block(index: int, block: nn.Module):
        handles = []
        for name in arch.linears:
            full = f"{arch.block(index)}{name}.weight"
            if full not in wanted:
                continue
            module = block.get_submodule(name)
            entry = stats[full] = LinearStats.empty(module.in_features, module.weight.device, gram)
            handles.append(module.register_forward_hook(lambda _m, args, _out, entry=entry: entry.add(args[0])))
        return lambda: [h.remove() for h in handles]

    store = ActivationStore()
    run_blocks(BlockStreamer(source), samples.ids, store, progress, on_block, label="calibrate")
    if arch.lm_head in wanted:
        head = stats[arch.lm_head] = LinearStats.empty(int(source.config["hidden_size"]), gram=gram)
        for row in range(len(samples.ids)):
            head.add(store.read(row))
    store.close()
    return {name: stats[name] for name in weight_names if name in stats}
