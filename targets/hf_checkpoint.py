"""What the Hugging Face quantized-checkpoint targets (hf-gptq, hf-awq) share: the folder writer,
the integer-grid conventions, and the runtime check (transformers with gptqmodel + optimum)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from quantkit.errors import QuantkitError
from quantkit.grids import Grid, QuantizedWeight
from quantkit.manifest import package_versions
from quantkit.quiet import silenced
from quantkit.recipe import Recipe
from quantkit.sequential import GridPlan
from quantkit.targets.base import ExportContext, ExportReport, Target

WEIGHTS = "model.safetensors"
MAX_SHARD_BYTES = 4 * 2**30  # shard size the HF ecosystem commonly uses
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "generation_config.json", "chat_template.jinja", "chat_template.json")


def unsigned_codes_and_zeros(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes shifted to [0, 2^b) and integer zero points ``(rows, groups)`` for an IntGrid weight."""
    grid = qw.grid
    if grid.symmetric:
        offset = 2 ** (grid.bits - 1)
        zeros = torch.full(qw.params.scale.shape[:2], offset, dtype=torch.int32)
        return qw.codes + offset, zeros
    return qw.codes, qw.params.zero[..., 0].to(torch.int32)


class ShardWriter:
    """Writes tensors into ``model.safetensors``, or into numbered shards plus
    ``model.safetensors.index.json`` once they exceed ``max_shard_bytes``; holds one shard in memory."""

    def __init__(self, path: Path, max_shard_bytes: int):
        self.path, self.max_shard_bytes = path, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, self.path / f".shard-{len(self.shards)}.safetensors", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if not self.shards:
            save_file(self.pending, self.path / WEIGHTS, metadata={"format": "pt"})
            return
        if self.pending:
            self._flush()
        total = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            (self.path / f".shard-{i}.safetensors").rename(self.path / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {}, "weight_map": weight_map}
        (self.path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_quantized_checkpoint(ctx: ExportContext, path: Path, grid: Grid,
                               pack: Callable[[QuantizedWeight], dict[str, torch.Tensor]],
                               quantization_config: dict, dtype: torch.dtype = torch.float16,
                               notes: tuple[str, ...] = (), plan: GridPlan | None = None) -> ExportReport:
    """An HF folder: quantized linears packed by ``pack``, every other tensor in ``dtype`` (as the
    method left it: AWQ rescales norms), config with ``quantization_config``, tokenizer copied.
    With a ``plan`` each block linear is quantized on its own grid of it (in one layer-by-layer pass)."""
    source = ctx.source
    quantized = set(ctx.quantized_names)
    rename = source.arch.checkpoint_name
    path.mkdir()
    writer = ShardWriter(path, MAX_SHARD_BYTES)
    for name in tqdm(sorted(source.tensors), desc=f"write {path.name}", unit="tensor", disable=not ctx.progress,
                     leave=False):
        if name in quantized:
            prefix = rename(name).removesuffix(".weight")
            own = plan.grid_for(name) if plan else grid
            for key, value in pack(ctx.quantize(name, own, plan)).items():
                writer.add(f"{prefix}.{key}", value)
        else:
            writer.add(rename(name), ctx.load(name, grid, plan).to(dtype))
    writer.close()
    config = dict(source.config)
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_model_files(source.path, path)
    return ExportReport(notes)


def copy_model_files(source_dir: Path, dest: Path) -> None:
    for name in COPIED_FILES:
        if (source_dir / name).is_file():
            shutil.copy(source_dir / name, dest / name)


def hf_logits(path: Path, ids: torch.Tensor, progress: bool, **load_options) -> Iterator[np.ndarray]:
    """Logits from the checkpoint folder loaded by transformers with its own quantization backend
    (``load_options`` go to ``from_pretrained``)."""
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    hf_logging.disable_progress_bar()
    try:
        # gptqmodel prints banners and logs on stdout; keep stdout clean for --json (and quiet runs silent)
        with contextlib.redirect_stdout(sys.stderr), silenced():
            model = _load_for_logits(path, load_options)
    except ImportError as exc:
        raise QuantkitError(f"transformers cannot load {path.name} ({exc}); pip install 'quantkit[hf]'") from None
    model.eval()
    with torch.no_grad():
        for row in tqdm(ids, desc=f"transformers {path.name}", unit="seq", disable=not progress, leave=False):
            yield model(input_ids=row[None]).logits[0].float().numpy()


def has_dynamic(path: Path) -> bool:
    """Whether the folder's GPTQ config gives some modules their own bits (GPTQModel's ``dynamic``)."""
    config = json.loads((path / "config.json").read_text())
    return bool((config.get("quantization_config") or {}).get("dynamic"))


def _load_for_logits(path: Path, load_options: dict) -> torch.nn.Module:
    """The folder as a transformers model in fp32 activations (what a CPU deployment runs; the backend decodes the
    packed weights). Per-module bits (``dynamic``) are read by GPTQModel's loader: transformers' own GPTQ
    integration (optimum) ignores them and would unpack every module at the default width."""
    if has_dynamic(path):
        from gptqmodel import BACKEND, GPTQModel

        # gptqmodel's automatic choice takes one kernel for every module from the default bits; its plain torch
        # kernel reads each module at its own width. That kernel loads only in 16 bits; it decodes its weights to
        # the input's dtype, so the model then runs in fp32 like the other checks
        model = GPTQModel.load(str(path), device="cpu", dtype=torch.float16, backend=BACKEND.GPTQ_TORCH,
                               **load_options).model
        return model.float()
    from transformers import AutoModelForCausalLM

    with fused_experts_split(path):
        return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32, **load_options)


_ABSENT = object()


@contextlib.contextmanager
def fused_experts_split(path: Path) -> Iterator[None]:
    """While open, transformers loads a mixture-of-experts checkpoint with one linear per expert.

    transformers 5 keeps experts as fused 3-D tensors, which its GPTQ / AWQ loading cannot fill from
    per-expert quantized linears; gptqmodel's defuser patches the model classes and the checkpoint name
    mapping so that experts load one linear each (what ``GPTQModel.load`` does too). The patch is global to
    the process, so what it replaced is put back on exit: models built later (quantkit's own streamed passes,
    a user's) are transformers' own again. A no-op for dense models and unquantized folders (config.json
    alone decides: nothing else of the folder is read)."""
    from quantkit.arch import ARCHITECTURES

    config = json.loads((path / "config.json").read_text())
    families = [ARCHITECTURES[n] for n in config.get("architectures") or [] if n in ARCHITECTURES]
    if "quantization_config" not in config or not any(f.experts for f in families):
        yield
        return
    import importlib

    import defuser
    from defuser.model_registry import MODEL_CONFIG, PATCH
    from transformers import conversion_mapping, modeling_utils

    model_type = config["model_type"]
    patched = [(conversion_mapping, "get_checkpoint_conversion_mapping"),
               (modeling_utils, "get_checkpoint_conversion_mapping")]
    for original, _ in MODEL_CONFIG.get(model_type, {}).get(PATCH.REPLACE_MODULE, []):
        module, _, name = original.rpartition(".")
        patched.append((importlib.import_module(module), name))
    saved = [(owner, name, getattr(owner, name, _ABSENT)) for owner, name in patched]
    try:
        if not defuser.replace_fused_blocks(model_type):
            raise QuantkitError(f"gptqmodel's defuser cannot split {model_type}'s experts in this transformers; "
                                "transformers cannot load the quantized experts")
        yield
    finally:
        for owner, name, value in saved:
            if value is _ABSENT:
                if hasattr(owner, name):
                    delattr(owner, name)
            else:
                setattr(owner, name, value)


class HFCheckpointTarget(Target):
    """A folder that transformers loads with its gptqmodel backend; stores the recipe's integer grid."""

    def __init__(self, option: str | None):
        if option:
            raise QuantkitError(f"{self.kind} takes no option (got {option!r}); set the grid with "
                                "--bits / --group-size / --scheme")
        super().__init__(None)
        self.checked_by = "transformers"

    def configure(self, recipe: Recipe) -> None:
        self.checked_by = recipe.runtime

    def grid(self, recipe: Recipe) -> Grid:
        return recipe.int_grid()

    def bits_per_weight(self, recipe: Recipe) -> float:
        return self.grid(recipe).bits_per_weight()

    def filename(self) -> str:
        return self.kind

    def runtime(self) -> dict:
        if self.checked_by == "quantkit":
            from quantkit import __version__

            return {"name": "quantkit QuantLinear (torch reference on CPU, Triton W4A16 on CUDA)",
                    "version": {"quantkit": __version__, "torch": torch.__version__}}
        versions = package_versions(("transformers", "gptqmodel", "optimum"))
        return {"name": "transformers + gptqmodel", "version": versions}

    def logits(self, path: Path, ids: torch.Tensor, progress: bool = True) -> Iterator[np.ndarray]:
        if self.checked_by == "quantkit":
            return quantkit_logits(path, ids, progress)
        return hf_logits(path, ids, progress)


def quantkit_logits(path: Path, ids: torch.Tensor, progress: bool) -> Iterator[np.ndarray]:
    """Logits from quantkit's own runtime: the folder loaded with QuantLinear layers."""
    from quantkit.kernels.quant_linear import load_quantized_model

    model = load_quantized_model(path)
    device = next(model.parameters()).device
    with torch.no_grad():
        for row in tqdm(ids, desc=f"quantkit {path.name}", unit="seq", disable=not progress, leave=False):
            yield model(input_ids=row[None].to(device)).logits[0].float().cpu().numpy()
