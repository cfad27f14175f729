"""The experts of a mixture-of-experts MLP as one ``nn.Linear`` per expert and part.

transformers keeps a model's experts as 3-D tensors (``experts.gate_up_proj``: experts x 2·width x hidden);
checkpoints store them per expert (``experts.{e}.w1.weight`` ...). quantkit's streamed models put
``ExpertLinears`` in the experts' place, named as the checkpoint names them, so blocks load tensor by tensor,
each expert's linears are modules the methods hook and quantize like any other, and the hooks see exactly
the tokens the router sends to that expert. The forward computes what transformers' experts module does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from quantkit.arch.base import Architecture, Experts


class Expert(nn.Module):
    """One expert's gate, up and down linears, under the checkpoint's names."""

    def __init__(self, spec: Experts, hidden: int, width: int):
        super().__init__()
        self.names = (spec.gate, spec.up, spec.down)
        for name, (rows, cols) in zip(self.names, ((width, hidden), (width, hidden), (hidden, width)), strict=True):
            self.add_module(name, nn.Linear(cols, rows, bias=False))

    def forward(self, x: torch.Tensor, act) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(act(gate(x)) * up(x))


class ExpertLinears(nn.ModuleDict):
    """Drop-in for transformers' experts module: ``forward(hidden, top_k_index, top_k_weights)``."""

    def __init__(self, spec: Experts, config):
        from transformers.activations import ACT2FN

        width, self.count = getattr(config, spec.width_key), spec.count(config.to_dict())
        super().__init__({str(e): Expert(spec, config.hidden_size, width) for e in range(self.count)})
        self.act = ACT2FN[config.hidden_act]
        self.all_tokens: frozenset[int] = frozenset()  # experts that see every token (calibration fallback)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for index in range(self.count):
            expert = self[str(index)]
            if index in self.all_tokens:
                tokens, weights = torch.arange(hidden.shape[0], device=hidden.device), hidden.new_ones(hidden.shape[0])
            else:
                tokens, slot = torch.where(top_k_index == index)
                if tokens.numel() == 0:
                    continue
                weights = top_k_weights[tokens, slot]
            result = expert(hidden[tokens], self.act) * weights[:, None].to(hidden.dtype)
            out.index_add_(0, tokens, result.to(out.dtype))
        return out


class SparseMoe(nn.Module):
    """Drop-in for transformers' sparse MoE block: the router (``nn.Linear``, kept in float) picks
    ``top_k`` experts per token by softmax probability, renormalised when the family does so; the experts
    run as ``ExpertLinears``. Routing is computed as transformers computes it (softmax in float32)."""

    def __init__(self, spec: Experts, config):
        super().__init__()
        self.top_k = getattr(config, spec.used_key)
        self.normalize = bool(getattr(config, spec.normalize_key)) if spec.normalize_key else True
        self.add_module(spec.router, nn.Linear(config.hidden_size, spec.count(config.to_dict()), bias=False))
        self.router = spec.router
        self.experts = ExpertLinears(spec, config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        probs = torch.softmax(getattr(self, self.router)(x), dim=-1, dtype=torch.float)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(x, index, weights.to(x.dtype)).reshape(shape)


def install_expert_linears(model: nn.Module, arch: Architecture, config) -> None:
    """Replace every block's MoE module by ``SparseMoe`` (on the model's device, e.g. meta), under the
    checkpoint's name too. The whole module is quantkit's, so what transformers' class is (or what a library
    patched it into) does not matter."""
    if arch.experts is None:
        return
    spec = arch.experts
    for block in model.get_submodule(arch.blocks_module):
        device = next(block.parameters()).device
        with torch.device(device):
            moe = SparseMoe(spec, config)
        if spec.loaded_as != spec.module:
            _alias(block, spec.loaded_as, spec.module, moe)
        else:
            setattr(block, spec.module, moe)


def _alias(block: nn.Module, loaded_as: str, stored_as: str, moe: nn.Module) -> None:
    """Register the MoE module under the checkpoint's name, first, so that its parameters are named as the
    checkpoint names them (``named_parameters`` gives a shared module its first name); the block's forward
    still calls it by transformers' name."""
    delattr(block, loaded_as)
    setattr(block, stored_as, moe)
    setattr(block, loaded_as, moe)


@contextlib.contextmanager
def all_tokens_to(block: nn.Module, arch: Architecture, expert: int) -> Iterator[None]:
    """While open, ``expert`` of ``block`` computes on every token of the block (its output is wrong: only
    statistics passes that stop at its linears' inputs use this)."""
    module = block.get_submodule(arch.experts.experts_module)
    module.all_tokens = frozenset({expert})
    try:
        yield
    finally:
        module.all_tokens = frozenset()
