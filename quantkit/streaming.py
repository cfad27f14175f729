"""A transformers model whose decoder blocks live on the ``meta`` device until they are needed, and
passes that run many token rows through it one block at a time.

Only the embedding, rotary embedding, final norm and lm_head are materialized up front; each block is
read from the checkpoint (lazily, tensor by tensor) when ``load_block`` is called and dropped again by
``release_block``. The layer-by-layer passes (GPTQ/AWQ, reference outputs, calibration statistics)
therefore hold one block in full precision at a time, plus activations. ``run_blocks`` keeps the
activations of every row in an ``ActivationStore``: in memory, or in a scratch file (``FileStore``), so
that more evaluation rows cost disk, not memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from quantkit.arch.moe import install_expert_linears
from quantkit.model import ModelSource


class BlockStreamer:
    def __init__(self, source: ModelSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.source, self.device, self.dtype = source, torch.device(device), dtype
        config = AutoConfig.from_pretrained(source.path)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        install_expert_linears(self.model, source.arch, config)  # experts by the checkpoint's names, per linear
        self.blocks = self.model.get_submodule(source.arch.blocks_module)
        arch = source.arch
        # the lm_head stays on meta: passes that need output logits project the final hidden states
        # themselves (``OutputProjection``), in vocabulary chunks
        self._materialize(self.model.get_submodule(arch.final_norm.rsplit(".", 1)[0]),
                          arch.final_norm.rsplit(".", 1)[0] + ".")
        embedding_module = arch.embedding.rsplit(".", 1)[0]
        parent, _, child = embedding_module.rpartition(".")
        original = self.model.get_submodule(embedding_module)
        # Gemma's embedding modules scale their rows by sqrt(hidden) themselves (an ``embed_scale`` buffer, on
        # meta here, so its value is recomputed as transformers sets it)
        scale = float(config.hidden_size) ** 0.5 if hasattr(original, "embed_scale") else None
        setattr(self.model.get_submodule(parent), child,
                StoredDtypeEmbedding(source.load_stored(arch.embedding).to(self.device), original.padding_idx, dtype,
                                     scale))
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

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.source.arch.final_norm.rsplit(".", 1)[0])


class StoredDtypeEmbedding(nn.Module):
    """An embedding kept in the checkpoint's dtype whose looked-up rows come out in ``dtype``: the same values
    as a float32 copy of the table (bf16 and fp16 widen exactly), at half its memory."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None, dtype: torch.dtype, scale: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.padding_idx, self.dtype, self.scale = padding_idx, dtype, scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.weight, self.padding_idx).to(self.dtype)
        # Gemma's scaled embedding modules multiply in the table's dtype, as here
        return rows if self.scale is None else rows * torch.tensor(self.scale, dtype=self.dtype)


class ActivationStore:
    """One activation tensor per row, kept in memory."""

    def __init__(self) -> None:
        self._rows: dict[int, torch.Tensor] = {}

    def write(self, index: int, value: torch.Tensor) -> None:
        self._rows[index] = value

    def read(self, index: int) -> torch.Tensor:
        return self._rows[index]

    def close(self) -> None:
        self._rows.clear()


class FileStore(ActivationStore):
    """Rows of one shape, float32, in a scratch file: written and read with plain file calls (no memory map,
    so the rows never count towards the process's memory)."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        super().__init__()
        self.path, self.shape = path, shape
        self.row_bytes = 4 * int(torch.Size(shape).numel())
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, index: int, value: torch.Tensor) -> None:
        data = value.detach().to("cpu", torch.float32).contiguous().reshape(self.shape).numpy().tobytes()
        os.pwrite(self._fd, data, index * self.row_bytes)

    def read(self, index: int) -> torch.Tensor:
        data = bytearray(os.pread(self._fd, self.row_bytes, index * self.row_bytes))
        return torch.frombuffer(data, dtype=torch.float32).reshape(self.shape)

    def close(self) -> None:
        os.close(self._fd)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@torch.no_grad()
def capture_rows(streamer: BlockStreamer, ids: torch.Tensor, store: ActivationStore) -> list[list[dict]]:
    """Each row's input to the first block into ``store``; returns every block's keyword arguments per row
    (``kwargs[row][block]``)."""
    from quantkit.sequential import capture_block_calls

    return capture_block_calls(streamer.model, streamer.blocks, ids, keep_first_input=store.write).kwargs


BlockHook = Callable[[int, nn.Module], Callable[[], None]]


@torch.no_grad()
def run_blocks(streamer: BlockStreamer, ids: torch.Tensor, store: ActivationStore, progress: bool = False,
               on_block: BlockHook | None = None, label: str = "blocks") -> None:
    """Run every row of ``ids`` through all blocks, one block in memory at a time, and leave each row's
    final hidden state, after the final norm, in ``store``.

    ``on_block(index, block)``, if given, is called with each loaded block before its rows run (to attach
    hooks) and returns a function called after them (to detach them).
    """
    from tqdm import tqdm

    from quantkit.sequential import block_output

    kwargs = capture_rows(streamer, ids, store)
    for index in tqdm(range(len(streamer.blocks)), desc=label, unit="block", disable=not progress, leave=False):
        block = streamer.load_block(index)
        done = on_block(index, block) if on_block else None
        try:
            for row in range(len(ids)):
                hidden = store.read(row).to(streamer.device)
                store.write(row, block_output(block(hidden, **kwargs[row][index])))
        finally:
            if done:
                done()
            streamer.release_block(index)
    norm = streamer.final_norm
    for row in range(len(ids)):
        store.write(row, norm(store.read(row).to(streamer.device)))


class OutputProjection:
    """Logits from final hidden states through the model's output matrix (the lm_head, or the tied
    embedding), kept in the checkpoint's dtype and multiplied in float32, a vocabulary chunk at a time."""

    VOCAB_CHUNK = 16384

    def __init__(self, source: ModelSource):
        name = source.arch.embedding if source.tied_embeddings else source.arch.lm_head
        self.weight = source.load_stored(name)  # the stored dtype: bf16 checkpoints keep half the memory
        self.softcap = source.config.get("final_logit_softcapping")  # Gemma 2: logits = cap * tanh(logits / cap)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        parts = [hidden @ self.weight[start : start + self.VOCAB_CHUNK].float().T
                 for start in range(0, self.weight.shape[0], self.VOCAB_CHUNK)]
        logits = torch.cat(parts, dim=-1)
        return logits if not self.softcap else torch.tanh(logits / self.softcap) * self.softcap


@torch.no_grad()
def streamed_logits(streamer: BlockStreamer, ids: torch.Tensor, progress: bool = False) -> Iterator[torch.Tensor]:
    """Logits of each row of ``ids``, computed block by block (one block in memory at a time)."""
    store = ActivationStore()
    run_blocks(streamer, ids, store, progress, label="reference")
    head = OutputProjection(streamer.source)
    for row in range(len(ids)):
        yield head(store.read(row)[0]).cpu()
