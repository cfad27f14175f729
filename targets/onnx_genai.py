"""An onnxruntime-genai model folder built by onnxruntime-genai's own model builder over quantkit's integers.

quantkit writes its GPTQ checkpoint of the model (its method's codes, scales and zero points; every other
tensor in fp32) to a scratch folder and hands it to ``onnxruntime_genai.models.builder``, which owns the
graph for its runtime (GroupQueryAttention with the KV cache, fused norms, rope caches, genai_config.json,
the tokenizer files and chat template). The builder re-exports pre-quantized linears as MatMulNBits; quantkit
then reads every MatMulNBits back from the folder and requires its codes, scales and zero points to equal its
own, layer by layer, so the artifact holds quantkit's weights and not a re-quantization. The token embedding
and lm_head stay in fp32 unless the recipe quantizes the head itself.

Two things the builder (0.18) reads from configs of transformers 4 are given to it in that form (rope base
and the longrope key ``type``; Gemma 3's local rope base): transformers 5 moved them into ``rope_parameters``,
where the builder would otherwise fall back to a base of 10000. Its Gemma 3 sliding-layer rope caches carry the
global layers' linear scaling (4B+ checkpoints); quantkit rewrites those two tensors unscaled, as transformers
computes them. Checked in onnxruntime-genai itself: the accuracy gate on the logits its generator computes,
and its tokenizer against tokenizer.json.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quantkit.arch.rope import rope_of
from quantkit.errors import QuantkitError
from quantkit.grids import IntGrid
from quantkit.quiet import silenced
from quantkit.recipe import Recipe
from quantkit.targets.base import ExportContext, ExportReport, Target
from quantkit.targets.gguf import first_difference
from quantkit.targets.hf_checkpoint import unsigned_codes_and_zeros, write_quantized_checkpoint
from quantkit.targets.hf_gptq import gptq_config, gptq_tensors
from quantkit.targets.onnx_graph import block_size_problem, to_matmul_nbits

CONFIG_FILE = "genai_config.json"
MODEL_FILE = "model.onnx"
INSTALL_HINT = "pip install 'quantkit[onnx]' (onnxruntime-genai and onnx-ir)"
# the Hugging Face classes the builder has a CPU model for, among the families quantkit reads
BUILDER_CLASSES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                             "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"})
BUILDER_BITS = (4, 8)
# GroupQueryAttention's fused rope reads cos/sin caches of rotary_width / 2 columns, a multiple of 8
ROTARY_HALF_MULTIPLE = 8
LAYER_NODE = re.compile(r"^/model/layers\.(\d+)/")
HEAD = "lm_head"
LOCAL_CACHES = ("cos_cache_local", "sin_cache_local")
# MatMulNBits' accuracy_level: the activations' type inside it (4: int8, the builder's default on CPU; 1: fp32)
ACCURACY_LEVELS = {"int8": 4, "fp32": 1}
DEFAULT_OPTION = "int8"


def _require_builder():
    try:
        import onnx  # noqa: F401
        import onnx_ir  # noqa: F401
        import onnxruntime_genai
        from onnxruntime_genai.models import builder
    except ImportError:
        raise QuantkitError(f"the onnx-genai target needs onnxruntime-genai's model builder; {INSTALL_HINT}") from None
    return onnxruntime_genai, builder


class WeightDigest:
    """Running digests of MatMulNBits weights, one per transformer layer (and one for the head): codes packed
    as MatMulNBits stores them, fp32 scales, unpacked zero points, row after row. A fused node (q, k and v in
    one) holds its parts' rows one after the other, so the builder's nodes in graph order and quantkit's
    linears in execution order give equal digests exactly when the stored weights are equal."""

    def __init__(self):
        self._parts: dict[str, list] = {}
        self.rows: dict[str, int] = {}

    def add(self, key: str, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> None:
        digests = self._parts.setdefault(key, [hashlib.sha256() for _ in range(3)])
        for digest, part in zip(digests, (codes, scales, zeros), strict=True):
            digest.update(np.ascontiguousarray(part).tobytes())
        self.rows[key] = self.rows.get(key, 0) + codes.shape[0]

    def summary(self) -> dict[str, tuple[str, str, str]]:
        return {key: tuple(d.hexdigest() for d in digests) for key, digests in self._parts.items()}


def digest_ours(ctx: ExportContext, grid: IntGrid) -> WeightDigest:
    """quantkit's quantized linears in MatMulNBits form, layer by layer in execution order, scales as the GPTQ
    checkpoint stores them (fp16). The method's results are the run's (cached), not computed again."""
    digest, quantized = WeightDigest(), set(ctx.quantized_names)
    arch = ctx.source.arch
    layers = [(str(i), arch.linear_weights(i)) for i in range(ctx.source.n_layers)]
    for key, names in [*layers, (HEAD, [arch.lm_head])]:
        for name in (n for n in names if n in quantized):
            qw = ctx.quantize(name, grid)
            codes, zeros = unsigned_codes_and_zeros(qw)
            stored = to_matmul_nbits(qw, (codes, zeros), grid.group_size, np.float16)
            zeros = zeros.expand(qw.shape[0], -1).numpy().astype(np.uint8)
            digest.add(key, stored.packed, stored.scales.astype(np.float32), zeros)
    return digest


def _unpack_zeros(packed: np.ndarray, bits: int, rows: int, groups: int) -> np.ndarray:
    per_byte = 8 // bits
    values = packed.reshape(rows, -1)[..., None] >> (np.arange(per_byte, dtype=np.uint8) * bits)
    return (values & ((1 << bits) - 1)).reshape(rows, -1)[:, :groups].astype(np.uint8)


class OnnxModelReader:
    """Initializers of a saved ONNX model, read one at a time (external data through a memory map)."""

    def __init__(self, folder: Path):
        import onnx

        self.folder = folder
        self.model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
        self.initializers = {t.name: t for t in self.model.graph.initializer}

    def array(self, name: str) -> np.ndarray:
        from onnx import helper, numpy_helper

        tensor = self.initializers[name]
        if not tensor.external_data:
            return numpy_helper.to_array(tensor)
        where = {entry.key: entry.value for entry in tensor.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        data = np.memmap(self.folder / where["location"], dtype=np.uint8, mode="r",
                         offset=int(where.get("offset", 0)), shape=(count * np.dtype(dtype).itemsize,))
        return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.dims))

    def overwrite(self, name: str, values: np.ndarray) -> None:
        """Replace an initializer's values with ones of the same shape and dtype, in place."""
        import onnx
        from onnx import helper, numpy_helper

        tensor = self.initializers[name]
        values = np.ascontiguousarray(values, dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type))
        if tuple(values.shape) != tuple(tensor.dims):
            raise QuantkitError(f"onnx-genai: {name} is {list(tensor.dims)}, not {list(values.shape)}")
        if not tensor.external_data:
            tensor.CopyFrom(numpy_helper.from_array(values, name))
            onnx.save_model(self.model, str(self.folder / MODEL_FILE))
            return
        where = {entry.key: entry.value for entry in tensor.external_data}
        with open(self.folder / where["location"], "r+b") as data:
            data.seek(int(where.get("offset", 0)))
            data.write(values.tobytes())

    def matmul_nbits(self) -> Iterator[tuple[str, dict, list[str]]]:
        from onnx import helper

        for node in self.model.graph.node:
            if node.op_type == "MatMulNBits":
                yield node.name, {a.name: helper.get_attribute_value(a) for a in node.attribute}, list(node.input)


def digest_builders(reader: OnnxModelReader) -> WeightDigest:
    """The builder's MatMulNBits weights, in graph order; those outside a layer are the head's."""
    digest = WeightDigest()
    for name, attributes, inputs in reader.matmul_nbits():
        match = LAYER_NODE.match(name)
        rows, cols, bits = int(attributes["N"]), int(attributes["K"]), int(attributes["bits"])
        groups = cols // int(attributes["block_size"])
        packed = reader.array(inputs[1]).reshape(rows, groups, -1)
        scales = reader.array(inputs[2]).astype(np.float32).reshape(rows, groups)
        if len(inputs) > 3 and inputs[3]:
            zeros = _unpack_zeros(reader.array(inputs[3]), bits, rows, groups)
        else:  # MatMulNBits' default zero point
            zeros = np.full((rows, groups), 1 << (bits - 1), np.uint8)
        digest.add(match.group(1) if match else HEAD, packed, scales, zeros)
    return digest


def adapt_builder_config(config, source_config: dict) -> None:
    """Give the builder the rope fields it reads where transformers 4 kept them."""
    rope = rope_of(source_config, "onnx-genai")
    params = {**rope.params, "rope_type": rope.kind, "type": rope.kind, "rope_theta": rope.theta}
    config.rope_parameters = params
    config.rope_theta = rope.theta
    if rope.sliding_theta is not None:
        config.rope_local_base_freq = rope.sliding_theta
    if rope.partial != 1.0:
        config.partial_rotary_factor = rope.partial


def unscaled_rope_caches(theta: float, rotary: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin of position x frequency for ``length`` positions, the builder's layout (rotary / 2 columns)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary, 2, dtype=torch.int64).float() / rotary))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return freqs.cos().numpy(), freqs.sin().numpy()


def fix_sliding_rope(reader: OnnxModelReader, source_config: dict, head_dim: int) -> bool:
    """Rewrite the sliding layers' rope caches without the global layers' scaling (which the builder applies
    to both); True when they needed it."""
    rope = rope_of(source_config, "onnx-genai")
    if rope.sliding_theta is None or rope.kind == "default" or not set(LOCAL_CACHES) <= set(reader.initializers):
        return False
    length = int(reader.initializers[LOCAL_CACHES[0]].dims[0])
    caches = unscaled_rope_caches(rope.sliding_theta, rope.rotary_dims(head_dim), length)
    for name, values in zip(LOCAL_CACHES, caches, strict=True):
        reader.overwrite(name, values)
    return True


def end_of_generation_ids(source_path: Path, config: dict) -> int | list[int] | None:
    """generation_config.json's eos list (instruct models end turns with several ids), else config.json's."""
    path = source_path / "generation_config.json"
    generation = json.loads(path.read_text()) if path.is_file() else {}
    return generation.get("eos_token_id", config.get("eos_token_id"))


class OnnxGenaiTarget(Target):
    kind = "onnx-genai"

    def __init__(self, option: str | None):
        option = (option or DEFAULT_OPTION).lower()
        if option not in ACCURACY_LEVELS:
            raise QuantkitError(f"unknown {self.kind} option {option!r}; use {self.kind}:int8 (int8 activations inside "
                                f"MatMulNBits, the builder's CPU default) or {self.kind}:fp32")
        super().__init__(None if option == DEFAULT_OPTION else option)
        self.accuracy_level = ACCURACY_LEVELS[option]

    def grid(self, recipe: Recipe) -> IntGrid:
        return recipe.int_grid()  # the checkpoint targets' grid: one GPTQ/AWQ pass serves all of them

    def bits_per_weight(self, recipe: Recipe) -> float:
        grid = self.grid(recipe)
        return grid.bits + (32 + grid.bits) / grid.group_size  # fp32 scale and a zero point per block

    def filename(self) -> str:
        return f"model-{self.kind}" + (f"-{self.option}" if self.option else "")

    def validate(self, ctx: ExportContext) -> None:
        _require_builder()
        arch, config = ctx.source.arch, ctx.source.config
        if arch.hf_class not in BUILDER_CLASSES:
            raise QuantkitError(f"{self.kind}: onnxruntime-genai's model builder has no CPU model for {arch.name} "
                                "checkpoints; use a gguf or hf-gptq target")
        grid = self.grid(ctx.recipe)
        if grid.bits not in BUILDER_BITS:
            raise QuantkitError(f"{self.kind}: the builder's MatMulNBits take 4- or 8-bit weights, not {grid.bits}; "
                                "use --bits 4 or 8 (or a GGUF target)")
        if grid.group_size <= 0:
            raise QuantkitError(f"{self.kind}: the builder reads group-wise GPTQ weights; use --group-size 32, 64 "
                                "or 128")
        if ctx.recipe.gptq_g_idx:
            raise QuantkitError(f"{self.kind}: act-order groups (g_idx) are not carried into MatMulNBits by the "
                                "builder; use --act-order static")
        if ctx.recipe.quantize_embeddings:
            raise QuantkitError(f"{self.kind}: the token embedding stays in fp32; drop --quantize-embeddings")
        for name in ctx.quantized_names:
            problem = block_size_problem(grid.group_size, ctx.source.tensors[name].shape[1])
            if problem:
                raise QuantkitError(f"{self.kind}: {problem} for {name}; use --group-size 32, 64 or 128")
        window, context = config.get("sliding_window"), int(config.get("max_position_embeddings") or 0)
        if window and context and int(window) > context:
            raise QuantkitError(f"{self.kind}: sliding_window {window} is longer than the model's context "
                                f"({context}); onnxruntime-genai's KV buffer must hold a whole window")
        rotary = rope_of(config, self.kind).rotary_dims(arch.head_dim(config))
        if (rotary // 2) % ROTARY_HALF_MULTIPLE:
            raise QuantkitError(f"{self.kind}: onnxruntime's GroupQueryAttention rotates a multiple of "
                                f"{2 * ROTARY_HALF_MULTIPLE} dimensions per head, this model {rotary}; use a gguf "
                                "or hf-gptq target")

    def export(self, ctx: ExportContext, path: Path) -> ExportReport:
        _, builder = _require_builder()
        grid = self.grid(ctx.recipe)
        scratch = Path(tempfile.mkdtemp(prefix=".onnx-genai-input-", dir=path.parent))
        try:
            checkpoint = scratch / "gptq"
            write_quantized_checkpoint(ctx, checkpoint, grid, gptq_tensors, gptq_config(ctx, grid),
                                       dtype=torch.float32)
            self._build(builder, ctx, checkpoint, scratch / "cache", path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        reader = OnnxModelReader(path)
        ours = digest_ours(ctx, grid)
        self._check_weights(ours, digest_builders(reader))
        notes = [f"graph by onnxruntime-genai's model builder {metadata.version('onnxruntime-genai')}: "
                 f"{len(ctx.quantized_names)} quantized linears equal to quantkit's codes, scales "
                 f"and zero points in its MatMulNBits ({self.option or DEFAULT_OPTION} activations inside them)"]
        if fix_sliding_rope(reader, ctx.source.config, ctx.source.arch.head_dim(ctx.source.config)):
            notes.append("sliding layers' rope caches rewritten without the global layers' scaling")
        self._finish_config(ctx, path)
        return ExportReport(tuple(notes))

    def _build(self, builder, ctx: ExportContext, checkpoint: Path, cache: Path, path: Path) -> None:
        keep_float = ["/model/embed_tokens/Gather"]
        if ctx.source.arch.lm_head not in ctx.quantized_names:
            keep_float.append("/lm_head/MatMul")
        options = ["shared_embeddings=false", f"nodes_to_exclude={','.join(keep_float)}",
                   f"accuracy_level={self.accuracy_level}"]
        with silenced():
            extra = builder.parse_extra_options(None, str(checkpoint), str(path), "int4", "cpu", str(cache), options)
            adapt_builder_config(extra["hf_details"]["hf_config"], ctx.source.config)
            try:
                builder.create_model(None, str(checkpoint), str(path), "int4", "cpu", str(cache), **extra)
            except Exception as exc:  # the builder raises whatever its graph code meets
                raise QuantkitError(f"{self.kind}: onnxruntime-genai's model builder failed on this checkpoint "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc

    @staticmethod
    def _check_weights(ours: WeightDigest, theirs: WeightDigest) -> None:
        expected, got = ours.summary(), theirs.summary()
        for key in sorted(set(expected) | set(got), key=lambda k: (k == HEAD, int(k) if k.isdigit() else 0)):
            where = "the lm_head" if key == HEAD else f"layer {key}"
            if key not in got or key not in expected:
                raise QuantkitError(f"onnx-genai: the builder's MatMulNBits and quantkit's quantized linears differ "
                                    f"in {where} (one side has none); the folder is not kept")
            for part, mine, built in zip(("codes", "scales", "zero points"), expected[key], got[key], strict=True):
                if mine != built:
                    raise QuantkitError(f"onnx-genai: the builder stored other {part} than quantkit's in {where}; "
                                        "the folder is not kept")

    @staticmethod
    def _finish_config(ctx: ExportContext, path: Path) -> None:
        """genai_config.json: every end-of-generation id of generation_config.json, greedy unless it samples."""
        config_path = path / CONFIG_FILE
        config = json.loads(config_path.read_text())
        eos = end_of_generation_ids(ctx.source.path, ctx.source.config)
        if eos is not None:
            config["model"]["eos_token_id"] = eos
        if not config["search"].get("do_sample"):
            config["search"]["top_k"] = 1
        config_path.write_text(json.dumps(config, indent=4) + "\n")

    def logits(self, path: Path, ids: torch.Tensor, progress: bool = True) -> Iterator[np.ndarray]:
        """Each row appended to a fresh generator as one prompt; the logits its decoder computed for every
        position (the same forward its generation loop runs)."""
        og, _ = _require_builder()
        model = og.Model(str(path))
        for row in tqdm(ids, desc=f"onnxruntime-genai {path.name}", unit="seq", disable=not progress,
                        leave=False):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=generator_length(path, row.numel()), batch_size=1)
            generator = og.Generator(model, params)
            generator.append_tokens(row.numpy()[None].astype(np.int32))
            yield np.asarray(generator.get_output("logits"))[0].astype(np.float32)

    def load_check_row(self, path: Path, seq_len: int) -> torch.Tensor:
        """One ordinary token repeated: onnxruntime-genai masks the padding id out of a prompt, and a prompt of
        nothing but padding crashes its attention (0.18), so the row must not be the padding id."""
        model = json.loads((path / CONFIG_FILE).read_text())["model"]
        token = 0 if model.get("pad_token_id") != 0 else min(1, int(model["vocab_size"]) - 1)
        return torch.full((1, seq_len), token, dtype=torch.long)

    def verify_tokenizer(self, path: Path, tokenizer, texts: list[str]) -> dict | None:
        """onnxruntime-genai's tokenizer (its own implementation, read from the folder's tokenizer.json) against
        transformers' on the evaluation texts."""
        og, _ = _require_builder()
        ours = og.Tokenizer(og.Model(str(path)))
        mismatched, tokens, first = 0, 0, None
        for text in texts:
            theirs = list(tokenizer.encode(text, add_special_tokens=False))
            got = [int(t) for t in ours.encode(text)]
            tokens += len(theirs)
            if got != theirs:
                mismatched += 1
                first = first or first_difference(text, theirs, got, tokenizer)
        result = {"texts": len(texts), "tokens": tokens, "mismatched_texts": mismatched, "match": mismatched == 0}
        if first:
            result["first_mismatch"] = first
        return result

    def runtime(self) -> dict:
        versions = {package: metadata.version(package) for package in ("onnxruntime-genai", "onnxruntime")}
        return {"name": "onnxruntime-genai", "version": versions}


def generator_length(folder: Path, wanted: int) -> int:
    """A generator's max_length for ``wanted`` positions: its KV buffer must hold a sliding window whole, and
    may not pass the model's context."""
    model = json.loads((folder / CONFIG_FILE).read_text())["model"]
    window = (model["decoder"].get("sliding_window") or {}).get("window_size", 0)
    return min(max(wanted, int(window)), int(model["context_length"]))

