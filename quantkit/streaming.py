"""A transformers model whose decoder blocks live on the ``meta`` device until they are needed.

Only the embedding, rotary embedding, final norm and lm_head are materialized up front; each block is
read from the checkpoint (lazily, tensor by tensor) when ``load_block`` is called and dropped again by
``release_block``. The layer-by-layer passes (GPTQ/AWQ, reference logits) therefore hold one block
in full precision at a time, plus activations.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.model import ModelSource


class BlockStreamer:
    def __init__(self, source: ModelSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.source, self.device, self.dtype = source, torch.device(device), dtype
        config = AutoConfig.from_pretrained(source.path)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self.blocks = self.model.get_submodule(source.arch.blocks_module)
        arch = source.arch
        for weight in (arch.embedding, arch.final_norm, arch.lm_head):
            if weight in source.tensors:
                self._materialize(self.model.get_submodule(weight.rsplit(".", 1)[0]), weight.rsplit(".", 1)[0] + ".")
        if source.tied_embeddings:
            self.model.tie_weights()
        rotary = self.model.get_submodule(arch.rotary_module)
        parent, _, child = arch.rotary_module.rpartition(".")
        setattr(self.model.get_submodule(parent), child, type(rotary)(config=config).to(self.device))

    def _materialize(self, module: nn.Module, prefix: str) -> None:
        module.to_empty(device=self.device)
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(self.source.load(prefix + name).to(self.dtype))

    def load_block(self, index: int) -> nn.Module:
        block = self.blocks[index]
        self._materialize(block, self.source.arch.block(index))
        return block

    def release_block(self, index: int) -> None:
        self.blocks[index].to("meta")


@torch.no_grad()
def streamed_logits(streamer: BlockStreamer, ids: torch.Tensor, progress: bool = False) -> list[torch.Tensor]:
    """Logits of each row of ``ids``, computed block by block (one block in memory at a time)."""
    from tqdm import tqdm

    from quantkit.sequential import block_output, capture_block_inputs

    arch = streamer.source.arch
    model = streamer.model
    inputs = capture_block_inputs(model, streamer.blocks[0], ids.to(streamer.device))
    for index in tqdm(range(len(streamer.blocks)), desc="reference", unit="block", disable=not progress,
                      leave=False):
        block = streamer.load_block(index)
        inputs = [((block_output(block(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
        streamer.release_block(index)
    norm = model.get_submodule(arch.final_norm.rsplit(".", 1)[0])
    head = model.get_output_embeddings()
    return [head(norm(args[0]))[0].float().cpu() for args, _ in inputs]
