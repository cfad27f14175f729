"""ONNX decoders for onnxruntime: quantkit's integers in ``MatMulNBits`` nodes, with a KV cache.

The artifact is a folder: ``model.onnx`` (plus ``model.onnx.data`` once the weights pass
``EXTERNAL_DATA_BYTES``, because a protobuf cannot exceed 2 GiB), ``config.json`` and the tokenizer
files. It is checked by running it in onnxruntime (CPU provider) over the evaluation windows;
``greedy_generate`` decodes with the KV cache the way an application would.

Options: ``onnx`` / ``onnx:fp32`` (fp32 activations, fp32 scales) and ``onnx:fp16`` (fp16
activations and scales; norms' statistics and softmax stay fp32, as in transformers).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quantkit.errors import QuantkitError
from quantkit.grids import IntGrid
from quantkit.model import ModelSource
from quantkit.onnx_decoder import OnnxDecoder
from quantkit.recipe import Recipe
from quantkit.targets.base import ExportContext, ExportReport, Target
from quantkit.targets.hf_checkpoint import copy_model_files, unsigned_codes_and_zeros

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_BYTES = 1 << 30  # keep weights inline below 1 GiB; the protobuf limit is 2 GiB
ACTIVATION_TYPES = {"fp32": np.float32, "fp16": np.float16}
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inv_freq does not depend on the length


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise QuantkitError("the onnx / ort targets need onnx and onnxruntime; pip install 'quantkit[onnx]'") from None


def rotary_parameters(source: ModelSource) -> tuple[np.ndarray, float]:
    """inv_freq and attention scaling of the checkpoint's rotary embedding, as transformers computes them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    rope = source.config.get("rope_parameters") or source.config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in STATIC_ROPE_TYPES:
        raise QuantkitError(f"rope type {kind!r} changes with the sequence length and is not supported by the onnx "
                            f"target; supported: {', '.join(STATIC_ROPE_TYPES)}")
    config = AutoConfig.from_pretrained(source.path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    rotary = type(skeleton.get_submodule(source.arch.rotary_module))(config=config)
    return rotary.inv_freq.float().numpy(), float(getattr(rotary, "attention_scaling", 1.0))


class ONNXTarget(Target):
    kind = "onnx"

    def __init__(self, option: str | None):
        option = (option or "fp32").lower()
        if option not in ACTIVATION_TYPES:
            raise QuantkitError(f"unknown {self.kind} option {option!r}; use {self.kind}:fp32 or {self.kind}:fp16")
        super().__init__(None if option == "fp32" else option)
        self.activations = option
        self.float_dtype = ACTIVATION_TYPES[option]

    def grid(self, recipe: Recipe) -> IntGrid:
        return recipe.int_grid()  # the checkpoint targets' grid: one GPTQ/AWQ pass serves all of them

    def bits_per_weight(self, recipe: Recipe) -> float:
        grid = self.grid(recipe)
        group = grid.group_size if grid.group_size > 0 else None
        if group is None:
            return float(grid.bits)
        scale_bits = 8 * np.dtype(self.float_dtype).itemsize
        return grid.bits + (scale_bits + (0 if grid.symmetric else grid.bits)) / group

    def filename(self) -> str:
        return f"model-{self.kind}" + ("" if self.activations == "fp32" else f"-{self.activations}")

    def validate(self, ctx: ExportContext) -> None:
        from quantkit.targets.onnx_graph import FEATURES, MATMUL_NBITS_BITS, block_size_problem

        _require_onnx()
        missing = sorted(ctx.source.arch.features - FEATURES)
        if missing:
            others = "gguf or hf-gptq" + ("" if "mixture of experts" in missing else " or executorch")
            raise QuantkitError(f"{self.kind} cannot express {ctx.source.arch.name} models yet ({', '.join(missing)} "
                                f"not in its graph); use a {others} target")
        grid = self.grid(ctx.recipe)
        if grid.bits not in MATMUL_NBITS_BITS:
            raise QuantkitError(f"{self.kind}: onnxruntime's MatMulNBits runs {', '.join(map(str, MATMUL_NBITS_BITS))}"
                                f"-bit weights, not {grid.bits}; use --bits 4 or 8 (or a GGUF target)")
        if ctx.recipe.quantize_embeddings:
            raise QuantkitError(f"{self.kind}: the token embedding stays in float (no quantized Gather here); "
                                "drop --quantize-embeddings")
        for name in ctx.quantized_names:
            problem = block_size_problem(grid.group_size, ctx.source.tensors[name].shape[1])
            if problem:
                raise QuantkitError(f"{self.kind}: {problem} for {name}; use --group-size 32, 64 or 128")
        rotary_parameters(ctx.source)

    def export(self, ctx: ExportContext, path: Path) -> ExportReport:
        import onnx

        from quantkit.targets.onnx_graph import DecoderGraph, DecoderParts, GraphWriter, to_matmul_nbits

        grid = self.grid(ctx.recipe)
        inv_freq, attention_scaling = rotary_parameters(ctx.source)

        def quantized(name: str):
            qw = ctx.quantize(name, grid)
            return to_matmul_nbits(qw, unsigned_codes_and_zeros(qw), grid.group_size, self.float_dtype)

        parts = DecoderParts(ctx.source, lambda name: ctx.load(name, grid), quantized, set(ctx.quantized_names),
                             inv_freq, attention_scaling)
        path.mkdir()
        writer = GraphWriter(path / DATA_FILE)
        graph = DecoderGraph(parts, writer, self.float_dtype)
        model = graph.build(f"quantkit-{ctx.source.arch.name}", progress=ctx.progress)
        data_bytes = writer.close()
        if data_bytes < EXTERNAL_DATA_BYTES:
            onnx.load_external_data_for_model(model, str(path))
            for tensor in model.graph.initializer:
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
            (path / DATA_FILE).unlink()
        onnx.save_model(model, str(path / MODEL_FILE))
        copy_model_files(ctx.source.path, path)
        shutil.copy(ctx.source.path / "config.json", path / "config.json")
        return ExportReport((f"{self.activations} activations; quantized linears are com.microsoft MatMulNBits",))

    def model_file(self, path: Path) -> Path:
        return path / MODEL_FILE

    def logits(self, path: Path, ids: torch.Tensor, progress: bool = True) -> Iterator[np.ndarray]:
        decoder = OnnxDecoder(self.model_file(path))
        for row in tqdm(ids, desc=f"onnxruntime {path.name}", unit="seq", disable=not progress, leave=False):
            logits, _ = decoder.forward(row.numpy()[None])
            yield logits[0].astype(np.float32)

    def runtime(self) -> dict:
        versions = {package: metadata.version(package) for package in ("onnxruntime", "onnx")}
        return {"name": "onnxruntime (CPUExecutionProvider)", "version": versions}

