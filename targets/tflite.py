"""LiteRT (``.tflite``) models, as Android/iOS apps run them with LiteRT (formerly TensorFlow Lite).

Options (as for ``executorch``, the option fixes the weight bits; ``--bits`` is not read):

* ``tflite`` / ``tflite:8da4w`` - int4 symmetric weights in blocks of ``--group-size`` (32, 64, 128 or 256) with
  fp16 block scales, activations quantized to int8 at run time (LiteRT's "dynamic range" kernels).
* ``tflite:8da8w`` - int8 symmetric per-channel weights (fp32 scales), dynamic int8 activations.
* ``tflite:fp32`` - unquantized weights (the converter's arithmetic against transformers' own).

How: the model in torch carries the weights quantkit decoded from its own codes (exactly on the grid), litert-torch
converts it to a float ``.tflite``, and ai-edge-quantizer's "dequantized weight recovery" turns each block linear
back into integers and scales; it checks that they decode to the float weights within 1e-4, so the file holds
quantkit's grid, whatever method chose the codes (its integers can differ from quantkit's by a common factor where
a block uses only even codes; the decoded weights are the same, which the tests check by reading the file).

The token embedding stays fp32 (the converter cannot look up a 16-bit table) unless ``--quantize-embeddings``: then
it is int8 per row ([-127, 127], fp16 scales), looked up by LiteRT's int8 EMBEDDING_LOOKUP, and a tied lm_head
reads the same int8 table as a dynamic-range linear (one copy in the file). An untied lm_head stays fp32.

Limits, said in the report: one full-sequence forward of ``--seq-len`` tokens, no KV cache (litert-torch's
KV-cache export imports TensorFlow; not wired up here); the family must be one transformers' modules express
without mixture-of-experts routing.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quantkit.errors import QuantkitError
from quantkit.grids import PER_CHANNEL, PER_TENSOR, IntGrid
from quantkit.manifest import package_versions
from quantkit.quiet import silenced
from quantkit.recipe import Recipe
from quantkit.targets.base import DynamicActivationTarget, ExportContext, ExportReport
from quantkit.targets.hf_checkpoint import copy_model_files

BLOCK_SIZES = (32, 64, 128, 256)  # LiteRT's blockwise int4 granularities
MODEL_FILE = "model.tflite"
INSTALL_HINT = "pip install 'quantkit[litert]'"
# transformers names block modules <Family>DecoderLayer; the converter names each op after its module path
BLOCK_OP = r".*DecoderLayer_\d+/.*"
OUTSIDE_BLOCKS = r"^(?!.*DecoderLayer_\d+/).*"


@dataclass(frozen=True)
class LiteRTGrid(IntGrid):
    """Symmetric integers as LiteRT stores them. 8-bit codes lie in the narrow range [-127, 127] its kernels assume
    (4-bit ones use all of [-8, 7]). Block scales lie on bf16 values: the file keeps them in fp16, but
    ai-edge-quantizer rounds them to bf16 first (what XNNPACK's blockwise kernels read). Per-channel scales (fp32 in
    the file) lie on fp16 values, so that every code x scale is exact in fp32 and the float weights the converter
    sees are exactly on the grid."""

    @property
    def narrow(self) -> bool:
        return self.bits >= 8

    @property
    def qmin(self) -> int:
        return -self.qmax if self.narrow else super().qmin

    @property
    def name(self) -> str:
        return f"{super().name}-narrow" if self.narrow else super().name

    def stored_scale_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.group_size > 0 else torch.float16


def litert_grid(bits: int, group_size: int) -> LiteRTGrid:
    return LiteRTGrid(bits=bits, group_size=group_size, symmetric=True)


EMBEDDING_GRID = litert_grid(8, PER_CHANNEL)  # --quantize-embeddings: int8 rows, whatever the linears' layout


def save_decoded_model(ctx: ExportContext, grid: IntGrid | None, folder: Path) -> None:
    """The checkpoint as an fp32 Hugging Face folder, each quantized block linear holding the weights quantkit's codes
    decode to (other tensors as the method left them: AWQ rescales norms)."""
    model = ctx.source.hf_model(torch.float32, ctx.progress)
    params = dict(model.named_parameters())
    quantized = set(ctx.quantized_names) if grid is not None else set()
    with torch.no_grad():
        for name in ctx.source.tensors:
            if name not in params:
                continue
            if name not in quantized:
                value = ctx.load(name, grid)
            else:
                value = ctx.quantize(name, EMBEDDING_GRID if name == ctx.source.arch.embedding else grid).dequantize()
            params[name].copy_(value.float())
    model.save_pretrained(folder, safe_serialization=True)


# litert-torch imports JAX, whose threads make a later os.fork() in the importing process unsafe (Ray, multiprocessing,
# a build system's workers): the conversion runs in a child process that reads the decoded checkpoint
CONVERT = """
import sys, torch, litert_torch
from transformers import AutoModelForCausalLM
from quantkit.targets.executorch import LogitsOnly
folder, seq_len, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = LogitsOnly(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()).eval()
with torch.no_grad():
    litert_torch.convert(model, (torch.zeros(1, seq_len, dtype=torch.long),)).export(out)
"""


def convert(checkpoint: Path, seq_len: int, path: Path) -> None:
    """``checkpoint`` (an HF folder) as a float ``.tflite`` of one ``seq_len``-token forward, by litert-torch."""
    done = subprocess.run([sys.executable, "-c", CONVERT, str(checkpoint), str(seq_len), str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1][:300] if lines else f"exit code {done.returncode}"
        raise QuantkitError(f"litert-torch could not convert the model ({reason}); report this with the model")


def quantize_linears(float_model: Path, path: Path, grid: IntGrid, embedding: bool = False,
                     tied_head: bool = False) -> None:
    """The block linears of ``float_model`` as LiteRT dynamic-range integer weights recovered from their (on-grid)
    float values; with ``embedding`` the int8 table too, and with ``tied_head`` the output linear that shares it;
    everything else stays as it is."""
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer
    from ai_edge_quantizer.recipe_manager import RecipeManager

    recover = algorithm_manager.AlgorithmName.DEQUANTIZED_WEIGHT_RECOVERY
    ops, channels = qtyping.TFLOperationName, qtyping.QuantGranularity.CHANNELWISE
    granularity = channels if grid.group_size <= 0 else qtyping.QuantGranularity(f"BLOCKWISE_{grid.group_size}")
    recipe = RecipeManager()
    recipe.add_dynamic_config(regex=BLOCK_OP, operation_name=ops.FULLY_CONNECTED, num_bits=grid.bits,
                              granularity=granularity, algorithm_key=recover)
    if embedding:
        recipe.add_dynamic_config(regex=".*", operation_name=ops.EMBEDDING_LOOKUP, num_bits=EMBEDDING_GRID.bits,
                                  granularity=channels, algorithm_key=recover)
    if tied_head:  # the only linear outside the decoder layers
        recipe.add_dynamic_config(regex=OUTSIDE_BLOCKS, operation_name=ops.FULLY_CONNECTED,
                                  num_bits=EMBEDDING_GRID.bits, granularity=channels, algorithm_key=recover)
    run = quantizer.Quantizer(str(float_model))
    run.load_quantization_recipe(recipe.get_quantization_recipe())
    try:
        result = run.quantize()
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[-1][-400:]
        raise QuantkitError(f"ai-edge-quantizer could not store a block linear on {grid.name} ({reason}); report this "
                            "with the model") from None
    result.export_model(str(path), overwrite=True)


def fully_connected_weights(path: Path) -> list[dict]:
    """Each FULLY_CONNECTED op's weight in the file: name of the op's output, dtype, and, for integer weights, the
    decoded float values (codes x scales, read from the flatbuffer)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    model = fb.read_model(str(path))
    graph = model.subgraphs[0]
    found = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) != schema.BuiltinOperator.FULLY_CONNECTED:
            continue
        weight = graph.tensors[op.inputs[1]]
        output = graph.tensors[op.outputs[0]].name
        entry = {"op": output.decode() if isinstance(output, bytes) else output, "type": weight.type}
        if weight.type in (schema.TensorType.INT4, schema.TensorType.INT8):
            entry["decoded"] = _decode(model, graph, weight, schema)
        found.append(entry)
    return found


def _decode(model, graph, tensor, schema) -> np.ndarray:
    rows, cols = (int(d) for d in tensor.shape)
    raw = np.frombuffer(bytes(model.buffers[tensor.buffer].data), dtype=np.uint8)
    if tensor.type == schema.TensorType.INT4:  # two's complement nibbles, the first value in the low nibble
        nibbles = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1)[: rows * cols].astype(np.int16)
        codes = np.where(nibbles > 7, nibbles - 16, nibbles)
    else:
        codes = raw.view(np.int8).astype(np.int16)
    codes = codes.reshape(rows, cols).astype(np.float32)
    quant = tensor.quantization
    details = quant.details if quant is not None else None
    if details is not None and hasattr(details, "blockSize"):
        scale_tensor = graph.tensors[details.scales]
        scales = np.frombuffer(bytes(model.buffers[scale_tensor.buffer].data), dtype=np.float16)
        scales = scales.astype(np.float32).reshape(rows, cols // details.blockSize)
        return codes * np.repeat(scales, details.blockSize, axis=1)
    return codes * np.asarray(quant.scale, dtype=np.float32)[:, None]


def litert_versions() -> dict[str, str | None]:
    return package_versions(("litert-torch", "ai-edge-litert", "ai-edge-quantizer"))


class TFLiteTarget(DynamicActivationTarget):
    kind = "tflite"

    def grid(self, recipe: Recipe) -> IntGrid | None:
        layout = self.weight_layout(recipe)
        return None if layout is None else litert_grid(*layout)

    def bits_per_weight(self, recipe: Recipe) -> float:
        grid = self.grid(recipe)
        return 32.0 if grid is None else grid.bits_per_weight()

    def filename(self) -> str:
        return f"tflite-{self.option}"

    def validate(self, ctx: ExportContext) -> None:
        if litert_versions()["litert-torch"] is None:
            raise QuantkitError(f"the tflite target needs litert-torch and ai-edge-litert; {INSTALL_HINT}")
        if ctx.source.arch.experts:
            raise QuantkitError(f"{self.name} cannot express {ctx.source.arch.name} models (mixture of experts: "
                                "data-dependent routing does not convert); use a gguf or hf-gptq target")
        if ctx.source.arch.lm_head in ctx.quantized_names:
            raise QuantkitError(f"{self.name} quantizes the block linears only; drop --quantize-lm-head")
        grid = self.grid(ctx.recipe)
        if grid is None:
            if ctx.recipe.quantize_embeddings:
                raise QuantkitError(f"{self.name} stores float weights; drop --quantize-embeddings or use "
                                    "tflite:8da4w / tflite:8da8w")
            return
        if ctx.recipe.scheme != "sym":
            raise QuantkitError(f"{self.name} stores symmetric weights only (LiteRT's integer weights have no zero "
                                "point); use --scheme sym")
        if grid.bits == 4 and grid.group_size not in (*BLOCK_SIZES, PER_CHANNEL):
            shown = "per tensor" if grid.group_size == PER_TENSOR else grid.group_size
            blocks = ", ".join(map(str, BLOCK_SIZES))
            raise QuantkitError(f"{self.name}: LiteRT's int4 weights come in blocks of {blocks} or per channel (-1), "
                                f"not {shown}; set --group-size to one of those")
        excluded = set(self._block_linears(ctx)) - set(ctx.quantized_names)
        if excluded:
            raise QuantkitError(f"{self.name} quantizes every block linear; {sorted(excluded)[0]} is excluded: drop "
                                "--exclude for this target")

    @staticmethod
    def _block_linears(ctx: ExportContext) -> list[str]:
        source = ctx.source
        return [n for i in range(source.n_layers) for n in source.arch.linear_weights(i)]

    def export(self, ctx: ExportContext, path: Path) -> ExportReport:
        grid = self.grid(ctx.recipe)
        embedding = ctx.source.arch.embedding in ctx.quantized_names
        tied_head = embedding and ctx.source.tied_embeddings
        path.mkdir()
        with tempfile.TemporaryDirectory(prefix="quantkit-tflite-") as scratch:
            checkpoint, float_file = Path(scratch) / "checkpoint", Path(scratch) / "float.tflite"
            with silenced():
                save_decoded_model(ctx, grid, checkpoint)
            convert(checkpoint, ctx.recipe.seq_len, path / MODEL_FILE if grid is None else float_file)
            if grid is not None:
                with silenced():
                    quantize_linears(float_file, path / MODEL_FILE, grid, embedding=embedding, tied_head=tied_head)
        copy_model_files(ctx.source.path, path)
        kept = "token embedding and lm_head in fp32" if not embedding else \
            "token embedding int8 per row" + (" (the tied lm_head reads it as an int8 linear)" if tied_head else
                                              ", lm_head fp32")
        notes = [f"full-sequence forward of {ctx.recipe.seq_len} tokens, no KV cache (LiteRT KV-cache export not "
                 f"wired up); {kept}"]
        if grid is None:
            return ExportReport(tuple(notes), bits_per_weight=32.0)
        stored = fully_connected_weights(path / MODEL_FILE)
        integer = [w for w in stored if "decoded" in w]
        blocks = len(self._block_linears(ctx))
        if len(integer) != blocks + tied_head:
            raise QuantkitError(f"{path.name}: {len(integer)} linears hold integer weights, expected "
                                f"{blocks + tied_head}; the converter named some ops outside the decoder layers: "
                                "report this with the model")
        notes.append(f"{blocks} block linears in {grid.name}, activations int8 at run time (dynamic range)")
        return ExportReport(tuple(notes), bits_per_weight=grid.bits_per_weight())

    def logits(self, path: Path, ids: torch.Tensor, progress: bool = True) -> Iterator[np.ndarray]:
        runner, length = load_runner(path)
        for row in tqdm(ids, desc=f"litert {path.name}", unit="seq", disable=not progress, leave=False):
            if row.shape[0] != length:
                raise QuantkitError(f"{path.name} was converted for {length} tokens per sequence, got {row.shape[0]}; "
                                    f"export again with --seq-len {row.shape[0]}")
            outputs = runner(args_0=row[None].numpy().astype(np.int32))
            yield next(iter(outputs.values()))[0].astype(np.float32)

    def runtime(self) -> dict:
        return {"name": "LiteRT interpreter (ai-edge-litert)", "version": litert_versions()}


def load_runner(path: Path):
    """The model's signature runner in LiteRT's interpreter, and the token count it takes."""
    path = path / MODEL_FILE if path.is_dir() else path
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise QuantkitError(f"checking {path.name} needs LiteRT; {INSTALL_HINT}") from None
    with silenced():
        interpreter = Interpreter(model_path=str(path))
        runner = interpreter.get_signature_runner()
    shape = runner.get_input_details()["args_0"]["shape"]
    return runner, int(shape[1])
