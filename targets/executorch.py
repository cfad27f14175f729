"""ExecuTorch ``.pte`` programs lowered to XNNPACK, the CPU backend ExecuTorch ships to phones.

Options (the option fixes the weight bits, as a GGUF type does; ``--bits`` is not read):

* ``executorch`` / ``executorch:8da4w`` - int4 symmetric weights in groups of ``--group-size`` (a multiple
  of 32, or ``-1`` per channel) and int8 activations quantized per token at run time ("8da4w").
* ``executorch:8da8w`` - int8 symmetric per-channel weights, int8 dynamic activations (XNNPACK has no
  8-bit group-wise weights, so ``--group-size`` is not read).
* ``executorch:fp32`` - unquantized fp32 weights (the program's arithmetic against transformers' own).

The artifact is a folder: ``model.pte`` and the tokenizer files, what ExecuTorch's LLM runner takes. For
the families ``targets/executorch_llm.py`` expresses (Llama, Mistral, Qwen2, Qwen3) the program follows
that runner's convention: ``forward(tokens, input_pos)`` with a static KV cache held in buffers the
program mutates (a whole prompt in one call, then one token per call), and the constant methods the
runner reads (``get_max_seq_len``, ``get_vocab_size``, ``get_bos_id``, ``get_eos_ids``, ``use_kv_cache``,
...). Other families (Phi-3, Gemma) get transformers' module as one full-sequence forward of
``--seq-len`` tokens, with no KV cache.

The weights are quantkit's own codes and scales: each quantized linear becomes a module holding the
int8 codes, whose forward is the dynamic-activation / dequantize-weight / linear pattern that
XNNPACK's partitioner lowers to its ``qd8`` kernels (``quantized_decomposed`` ops: per-token
asymmetric activation quantization, per-channel-group weight dequantization). XNNPACK stores group
scales in bf16, so the 4-bit group grid fits its scales on bf16 values before choosing codes and the
stored weights decode exactly as quantkit's; per-channel scales are stored in fp32.

The token embedding is stored in 16 bits (the checkpoint's bf16/fp16, fp16 for fp32 checkpoints) and
looked up by ExecuTorch's portable kernel; with ``--quantize-embeddings`` (KV-cache programs) it holds the
grid's codes instead (4-bit groups or int8 per channel) for ExecuTorch's quantized embedding kernels, and a
tied lm_head becomes an int8 per-channel (8da8w) linear of the same table. An untied, unquantized lm_head stays an fp32
XNNPACK linear (``--quantize-lm-head`` makes it 8da4w/8da8w too); norms, rope and attention run in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from quantkit.errors import QuantkitError
from quantkit.grids import PER_CHANNEL, PER_TENSOR, IntGrid, QuantizedWeight
from quantkit.quiet import silenced
from quantkit.recipe import Recipe
from quantkit.targets.base import DynamicActivationTarget, ExportContext, ExportReport
from quantkit.targets.hf_checkpoint import copy_model_files

PROGRAM_FILE = "model.pte"
DEFAULT_CONTEXT = 512  # KV-cache slots: every decode step attends over all of them (masked), so fewer is faster
XNNPACK_GROUP_MULTIPLE = 32  # XNNPACK's blockwise int4 kernels take groups of 32k weights
INSTALL_HINT = "pip install 'quantkit[executorch]'"


@dataclass(frozen=True)
class XnnpackGrid(IntGrid):
    """Symmetric integers whose scales are fitted on the precision XNNPACK stores them in: bf16 for
    group-wise int4, fp32 per channel. Codes chosen on the stored scale decode exactly as stored."""

    # XNNPACK's blockwise weights are consecutive columns: GPTQ's act-order falls back to static groups.
    contiguous_groups_only = True

    @property
    def bf16_scales(self) -> bool:
        return self.group_size > 0

    @property
    def name(self) -> str:
        return f"{super().name}-{'bf16' if self.bf16_scales else 'fp32'}-scales"

    def stored_scale_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.bf16_scales else None

    def bits_per_weight(self) -> float:
        return self.bits + (16 / self.group_size if self.group_size > 0 else 0.0)


# A tied output head beside a quantized embedding table: int8 per channel, whatever the linears' bits
HEAD_GRID = XnnpackGrid(bits=8, group_size=PER_CHANNEL, symmetric=True)


class DynamicActivationQuantLinear(nn.Module):
    """A linear holding int8 codes and scales; its forward is the pattern XNNPACK lowers to int8-activation,
    int4/int8-weight kernels. Run eagerly, the same ops compute that arithmetic in torch."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.grid = qw.grid
        self.register_buffer("codes", qw.codes.to(torch.int8))
        scale = qw.params.scale[..., 0].float()  # (rows, groups); exact: the grid fitted it storable
        self.register_buffer("scales", scale if self.grid.group_size > 0 else scale[:, 0].contiguous())
        # XNNPACK ignores zero points of symmetric weights, but the partitioner expects the tensor
        self.register_buffer("zeros", torch.zeros(self.scales.shape, dtype=torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def decoded_weight(self) -> torch.Tensor:
        ops = quantized_ops()
        grid = self.grid
        if grid.group_size > 0:
            return ops.dequantize_per_channel_group(self.codes, self.scales, self.zeros, grid.qmin, grid.qmax,
                                                    torch.int8, grid.group_size, torch.float32)
        return ops.dequantize_per_channel(self.codes, self.scales, self.zeros, 0, grid.qmin, grid.qmax, torch.int8,
                                          out_dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = quantized_ops()
        # per-token asymmetric int8, the activation quantization XNNPACK's qd8 kernels do at run time
        scale, zero = ops.choose_qparams_per_token_asymmetric(x, torch.int8)
        xq = ops.quantize_per_token(x, scale, zero, -128, 127, torch.int8)
        xd = ops.dequantize_per_token(xq, scale, zero, -128, 127, torch.int8, torch.float32)
        return nn.functional.linear(xd, self.decoded_weight(), self.bias)


def quantized_ops():
    """torch's ``quantized_decomposed`` op namespace (registered on import of its defining module)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers the ops

    return torch.ops.quantized_decomposed


class StoredEmbedding(nn.Module):
    """The token embedding kept in 16 bits (a lookup is not a matmul: XNNPACK does not run it, and
    ExecuTorch's portable kernel reads any float type); rows are upcast to fp32 after the lookup."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).float()


class QuantizedEmbedding(nn.Module):
    """The token embedding as quantkit's symmetric integer codes, looked up by ExecuTorch's quantized kernels
    (``quantized_decomposed::embedding_4bit`` / ``embedding_byte``): 4-bit codes packed two per byte (even
    column in the high nibble, stored as code + 8), or int8 codes per channel; fp32 scales (the grid's values,
    stored exactly)."""

    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        register_quantized_embedding_ops()  # before export traces the forward
        grid = qw.grid
        self.bits = grid.bits
        codes = qw.codes.to(torch.int16)
        if self.bits == 4:
            unsigned = (codes + 8).to(torch.uint8)
            self.register_buffer("weight", (unsigned[:, 0::2] << 4) | unsigned[:, 1::2])
        else:
            self.register_buffer("weight", codes.to(torch.int8))
        scale = qw.params.scale[..., 0].float()
        self.register_buffer("scales", scale if grid.group_size > 0 else scale[:, 0].contiguous())
        self.qmin, self.qmax = grid.qmin, grid.qmax

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        op = ops.embedding_4bit if self.bits == 4 else ops.embedding_byte
        return op.dtype(self.weight, self.scales, None, self.qmin, self.qmax, ids, dtype=torch.float32)


def register_quantized_embedding_ops() -> None:
    """The ``quantized_decomposed`` embedding ops: their torch definitions (for export) and ExecuTorch's kernels
    (for the runtime), both registered on import."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401


def embedding_dtype(source_dtype: str) -> torch.dtype:
    """The checkpoint's own 16-bit type (lossless), or fp16 for fp32 checkpoints, as GGUF files keep them."""
    return torch.bfloat16 if source_dtype == "BF16" else torch.float16


class LogitsOnly(nn.Module):
    """The causal LM as one tensor-in, tensor-out forward: ids (1, seq) -> logits (1, seq, vocab)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def quantized_model(ctx: ExportContext, grid: IntGrid | None) -> nn.Module:
    """The checkpoint in torch with every quantized linear replaced by a module holding our codes;
    other tensors as the method left them (AWQ rescales norms). ``grid`` None: nothing quantized."""
    model = ctx.source.hf_model(torch.float32, ctx.progress)
    quantized = set(ctx.quantized_names) if grid is not None else set()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in ctx.source.tensors:
            if name not in quantized and name in params:
                params[name].copy_(ctx.load(name, grid))
    for name in sorted(quantized):
        linear = model.get_submodule(name.removesuffix(".weight"))
        replace_module(model, name, DynamicActivationQuantLinear(ctx.quantize(name, grid), linear.bias))
    embedding = ctx.source.arch.embedding
    dtype = embedding_dtype(ctx.source.tensors[embedding].dtype)
    replace_module(model, embedding, StoredEmbedding(params[embedding], dtype))
    return LogitsOnly(model).eval()


def context_length(ctx: ExportContext) -> int:
    """KV-cache slots of the program: the model's context up to DEFAULT_CONTEXT, at least --seq-len."""
    trained = int(ctx.source.config.get("max_position_embeddings") or DEFAULT_CONTEXT)
    return max(ctx.recipe.seq_len, min(trained, DEFAULT_CONTEXT))


def cached_model(ctx: ExportContext, grid: IntGrid | None, max_len: int) -> nn.Module:
    """The KV-cache decoder (``executorch_llm.CachedDecoder``) holding quantkit's codes for the quantized
    linears, fp32 weights for the rest, the embedding in 16 bits."""
    from quantkit.targets.executorch_llm import build_decoder
    from quantkit.targets.onnx import rotary_parameters

    source, arch = ctx.source, ctx.source.arch
    quantized = set(ctx.quantized_names) if grid is not None else set()
    biased = {f"{arch.block(i)}{n}.weight" for i in range(source.n_layers) for n in arch.biased_linears}

    def linear(name: str) -> nn.Module:
        bias = ctx.load(name.removesuffix(".weight") + ".bias", grid) if name in biased else None
        if name in quantized:
            return DynamicActivationQuantLinear(ctx.quantize(name, grid), bias)
        return float_linear(ctx.load(name, grid), bias)

    if arch.embedding in quantized:  # --quantize-embeddings
        embedding = QuantizedEmbedding(ctx.quantize(arch.embedding, grid))
        # a tied head in int8 per channel: a 4-bit head with int8 activations costs SmolLM2 +72 % perplexity
        tied_head = DynamicActivationQuantLinear(ctx.quantize(arch.embedding, HEAD_GRID), None) \
            if source.tied_embeddings else None
    else:
        stored = ctx.load(arch.embedding, grid)
        embedding = StoredEmbedding(stored, embedding_dtype(source.tensors[arch.embedding].dtype))
        tied_head = float_linear(stored) if source.tied_embeddings else None
    if tied_head is not None:
        lm_head = tied_head
    elif arch.lm_head in quantized:
        lm_head = DynamicActivationQuantLinear(ctx.quantize(arch.lm_head, grid), None)
    else:
        lm_head = float_linear(ctx.load(arch.lm_head, grid))
    return build_decoder(source, linear, lambda name: ctx.load(name, grid), embedding, lm_head,
                         rotary_parameters(source), max_len)


def float_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An fp32 ``nn.Linear`` holding ``weight`` (and ``bias``), frozen."""
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    module.weight = nn.Parameter(weight.float(), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.float(), requires_grad=False)
    return module


def runner_metadata(ctx: ExportContext, max_len: int) -> dict:
    """The constant methods ExecuTorch's LLM runner reads from a program."""
    config = ctx.source.config
    eos = config.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    bos = config.get("bos_token_id")
    return {"get_max_seq_len": max_len, "get_max_context_len": max_len, "get_vocab_size": config["vocab_size"],
            "get_bos_id": bos if bos is not None else -1, "get_eos_ids": eos_ids, "get_n_layers": ctx.source.n_layers,
            "use_kv_cache": True, "use_sdpa_with_kv_cache": False, "enable_dynamic_shape": True}


def replace_module(model: nn.Module, tensor_name: str, module: nn.Module) -> None:
    """Put ``module`` where the module owning ``tensor_name`` (e.g. ``model.layers.0.mlp.up_proj.weight``) is."""
    parent, _, child = tensor_name.removesuffix(".weight").rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@dataclass
class Delegation:
    """How much of the lowered graph XNNPACK took."""

    linears_delegated: int
    linears_total: int
    nodes_delegated: int
    nodes_total: int
    subgraphs: int

    @property
    def linear_fraction(self) -> float:
        return self.linears_delegated / max(self.linears_total, 1)


def delegation(graph_module) -> Delegation:
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    table = info.delegation_by_operator
    linears = [b for op, b in table.items() if "linear" in op or op.endswith("mm")]
    return Delegation(
        linears_delegated=sum(b.delegated for b in linears),
        linears_total=sum(b.delegated + b.non_delegated for b in linears),
        nodes_delegated=info.num_delegated_nodes,
        nodes_total=info.num_delegated_nodes + info.num_non_delegated_nodes,
        subgraphs=info.num_delegated_subgraphs,
    )


def lower_to_xnnpack(model: nn.Module, seq_len: int):
    """torch.export -> edge dialect with XNNPACK partitions -> ExecuTorch program; and the delegation."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = (torch.zeros(1, seq_len, dtype=torch.long),)
    with torch.no_grad():
        # strict=False: transformers' forward has Python control flow that dynamo's strict mode rejects
        exported = torch.export.export(model, example, strict=False)
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    return edge.to_executorch(), delegation(edge.exported_program().graph_module)


def lower_cached_to_xnnpack(model: nn.Module, max_len: int, metadata: dict):
    """torch.export with a dynamic token count (1 .. max_len) -> XNNPACK partitions -> program with the runner's
    constant methods; the cache buffers become program state the runtime keeps between calls."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    tokens = torch.export.Dim("tokens", min=1, max=max_len)
    example = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        exported = torch.export.export(model, example, dynamic_shapes=({1: tokens}, None), strict=True)
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()], constant_methods=metadata)
    return edge.to_executorch(), delegation(edge.exported_program().graph_module)


def kv_cache_program(ctx: ExportContext) -> bool:
    """Whether the family is one the KV-cache decoder expresses (else: the full-sequence program)."""
    from quantkit.targets.executorch_llm import FEATURES

    return ctx.source.arch.features <= FEATURES


def executorch_version() -> str | None:
    try:
        return metadata.version("executorch")
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class ExecuTorchReport(ExportReport):
    delegation: Delegation | None = None  # how much of the program XNNPACK took


class ExecuTorchTarget(DynamicActivationTarget):
    kind = "executorch"

    def grid(self, recipe: Recipe) -> XnnpackGrid | None:
        layout = self.weight_layout(recipe)
        if layout is None:
            return None
        bits, group_size = layout
        return XnnpackGrid(bits=bits, group_size=group_size, symmetric=recipe.scheme == "sym")

    def filename(self) -> str:
        return f"executorch-{self.option}"

    def validate(self, ctx: ExportContext) -> None:
        if executorch_version() is None:
            raise QuantkitError(f"the executorch target needs ExecuTorch installed; {INSTALL_HINT}")
        if ctx.source.arch.experts:
            raise QuantkitError(f"{self.name} cannot express {ctx.source.arch.name} models yet (mixture of experts: "
                                "torch.export cannot trace data-dependent routing); use a gguf or hf-gptq target")
        grid = self.grid(ctx.recipe)
        if grid is None:
            return
        if not grid.symmetric:
            raise QuantkitError(f"{self.name} stores symmetric weights only (XNNPACK's int4/int8 weights have no "
                                "zero point); use --scheme sym")
        if grid.group_size == PER_TENSOR:
            raise QuantkitError(f"{self.name}: XNNPACK has no per-tensor weights with dynamic activations; "
                                f"use --group-size 32, 64, 128 or 256, or -1 (per channel)")
        if grid.group_size > 0 and grid.group_size % XNNPACK_GROUP_MULTIPLE:
            raise QuantkitError(f"{self.name}: XNNPACK's int4 kernels need a group size that is a multiple of "
                                f"{XNNPACK_GROUP_MULTIPLE}, got {grid.group_size}; use 32, 64, 128 or 256, or -1")
        if ctx.recipe.quantize_embeddings and not kv_cache_program(ctx):
            raise QuantkitError(f"{self.name} quantizes the token embedding only in KV-cache programs (Llama, "
                                f"Mistral, Qwen2, Qwen3); {ctx.source.arch.name}'s full-sequence program keeps it in "
                                "16 bits: drop --quantize-embeddings")

    @staticmethod
    def _stored_bits(ctx: ExportContext, grid: XnnpackGrid) -> float:
        """Bits per quantized weight as stored: codes plus scales (bf16 per group, fp32 per channel)."""
        weights = scale_bits = 0
        for name in ctx.quantized_names:
            rows, cols = ctx.source.tensors[name].shape
            weights += rows * cols
            scale_bits += rows * (cols // grid.group_size * 16 if grid.group_size > 0 else 32)
        return grid.bits + scale_bits / max(weights, 1)

    def bits_per_weight(self, recipe: Recipe) -> float:
        grid = self.grid(recipe)
        return 32.0 if grid is None else grid.bits_per_weight()

    def export(self, ctx: ExportContext, path: Path) -> ExecuTorchReport:
        grid = self.grid(ctx.recipe)
        kv_cache = kv_cache_program(ctx)
        path.mkdir()
        with silenced():
            if kv_cache:
                max_len = context_length(ctx)
                program, delegated = lower_cached_to_xnnpack(cached_model(ctx, grid, max_len), max_len,
                                                             runner_metadata(ctx, max_len))
            else:
                program, delegated = lower_to_xnnpack(quantized_model(ctx, grid), ctx.recipe.seq_len)
        if delegated.linears_delegated < delegated.linears_total:
            missing = delegated.linears_total - delegated.linears_delegated
            raise QuantkitError(f"XNNPACK did not take {missing} of {delegated.linears_total} linears of "
                                f"{path.name}; they would run unquantized-kernel fallbacks: report this with the "
                                "model, or --exclude them")
        (path / PROGRAM_FILE).write_bytes(program.buffer)
        copy_model_files(ctx.source.path, path)
        bits = 32.0 if grid is None else self._stored_bits(ctx, grid)
        return ExecuTorchReport(tuple(self._notes(kv_cache, delegated)), bits_per_weight=bits, delegation=delegated)

    def logits(self, path: Path, ids: torch.Tensor, progress: bool = True) -> Iterator[np.ndarray]:
        """Each row in one call: a KV-cache program prefills it from position 0 (the cache slots of an
        earlier row are overwritten or masked), a full-sequence program runs its fixed length."""
        method = load_forward(path)
        kv_cache = has_kv_cache(method)
        expected = tuple(method.metadata.input_tensor_meta(0).sizes())
        for row in tqdm(ids, desc=f"executorch {path.name}", unit="seq", disable=not progress, leave=False):
            tokens = row[None].to(torch.long).contiguous()
            if kv_cache:
                yield method.execute([tokens, torch.zeros(1, dtype=torch.long)])[0][0].float().numpy()
                continue
            if (1, row.shape[0]) != expected:
                raise QuantkitError(f"{path.name} was exported for {expected[1]} tokens per sequence, got "
                                    f"{row.shape[0]}; export again with --seq-len {row.shape[0]}")
            yield method.execute([tokens])[0][0].float().numpy()

    def runtime(self) -> dict:
        return {"name": "ExecuTorch runtime (XNNPACK delegate)", "version": {"executorch": executorch_version()}}

    def _notes(self, kv_cache: bool, d: Delegation) -> list[str]:
        if kv_cache:
            lines = ["forward(tokens, input_pos) with a static KV cache (ExecuTorch's LLM runner convention)"]
        else:
            lines = ["full-sequence forward of --seq-len tokens, no KV cache (this family has no KV-cache program)"]
        if self.option != "fp32":
            lines.append("activations int8 per token at run time")
        if self.option == "8da8w":
            lines.append("8da8w: weights per channel (XNNPACK has no 8-bit groups); --group-size not used")
        lines.append(f"XNNPACK took {d.linears_delegated}/{d.linears_total} linears and "
                     f"{d.nodes_delegated}/{d.nodes_total} graph nodes in {d.subgraphs} subgraphs")
        return lines


def has_kv_cache(method) -> bool:
    """A KV-cache program takes (tokens, input_pos); a full-sequence one tokens only."""
    return method.metadata.num_inputs() == 2


def load_forward(path: Path):
    """The ``forward`` method of the program (``path``: the artifact folder or its model.pte), loaded by the
    ExecuTorch runtime."""
    path = path / PROGRAM_FILE if path.is_dir() else path
    try:
        from executorch.runtime import Runtime

        register_quantized_embedding_ops()  # a program with a quantized embedding calls these kernels
    except ImportError:
        raise QuantkitError(f"checking {path.name} needs the ExecuTorch runtime; {INSTALL_HINT}") from None
    with silenced():  # the runtime's native cpuinfo probe prints to stderr
        program = Runtime.get().load_program(path)
        method = program.load_method("forward")
        # a first run initialises the XNNPACK delegate, which probes too
        if has_kv_cache(method):
            method.execute([torch.zeros((1, 1), dtype=torch.long), torch.zeros(1, dtype=torch.long)])
        else:
            sizes = tuple(method.metadata.input_tensor_meta(0).sizes())
            method.execute([torch.zeros(sizes, dtype=torch.long)])
    return method
