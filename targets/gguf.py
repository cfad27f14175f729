"""GGUF files for llama.cpp: export and evaluation in llama.cpp itself (llama-cpp-python).

The file is written in one streaming pass: tensor infos first (types and sizes are known from
the shapes), then each tensor is read, quantized and written before the next is touched.
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.constants import GGUFEndian, GGUFValueType
from gguf.gguf_writer import WriterState
from tqdm import tqdm

from quantkit.arch.base import hparam
from quantkit.budget import BudgetFrame
from quantkit.errors import ArtifactLoadError, QuantkitError
from quantkit.grids import GGUF_GRIDS, GGUF_TYPES, GGUFBlockGrid, Grid, QuantizedWeight
from quantkit.llamacpp import without_extra_buffer_types
from quantkit.model import ROW_CHUNK_BYTES, ModelSource
from quantkit.recipe import Recipe
from quantkit.sequential import GridPlan
from quantkit.targets import gguf_budget
from quantkit.targets.base import ExportContext, ExportReport, Target
from quantkit.targets.gguf_mixes import (
    ModelFacts,
    TypeChooser,
    check_overrides_used,
    override_notes,
    override_type,
    parse_override,
    resolve,
)
from quantkit.targets.gguf_vocab import gguf_model_name, read_vocab, special_vocab

GGMLType = gguf.GGMLQuantizationType
FLOAT_BITS = {"F32": 32.0, "F16": 16.0, "BF16": 16.0}


@dataclass(frozen=True)
class GGUFPlan:
    """Every tensor of the file with its GGUF type, and the report lines the choice made (overrides that
    decided types, fallbacks); iterates over the tensors."""

    tensors: tuple[PlannedTensor, ...]
    notes: tuple[str, ...]

    def __iter__(self):
        return iter(self.tensors)


@dataclass
class PlannedTensor:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    grid: GGUFBlockGrid | None
    rope_heads: int | None = None  # rows are permuted for llama.cpp's rope layout with this many heads
    offset: float = 0.0  # added to the values (Gemma's norms: llama.cpp wants 1 + weight)
    parts: tuple[str, ...] = ()  # HF matrices stacked into this 3-D tensor, one per expert (``hf_name`` is the first)
    values: tuple[float, ...] = ()  # a tensor the family computes (rope factors): its F32 values, no HF tensor

    @property
    def hf_names(self) -> tuple[str, ...]:
        return self.parts or (self.hf_name,)

    def nbytes(self) -> int:
        kind = GGUF_TYPES[self.ggml_type.name]
        return int(np.prod(self.shape)) // kind.block * kind.block_bytes


def rope_row_order(rows: int, n_heads: int) -> torch.Tensor:
    """Row order that turns HF's half-split rope layout into ggml's interleaved pairs, per head."""
    head_dim = rows // n_heads
    return torch.arange(rows).reshape(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def fallback_note(row_length: int, wanted: str, written: str, names: list[str]) -> str:
    """One report line for every tensor that fell back from ``wanted`` to ``written``, blocks summarised."""
    kinds: dict[str, int] = {}
    for name in names:
        kind = name.split(".")[2] if name.startswith("blk.") else name.removesuffix(".weight")
        kinds[kind] = kinds.get(kind, 0) + 1
    listed = ", ".join(f"{kind} x{count}" if count > 1 else kind for kind, count in kinds.items())
    return (f"{len(names)} matri{'ces' if len(names) > 1 else 'x'} with rows of {row_length} do not fit {wanted}'s "
            f"blocks; written as {written}, as llama.cpp does ({listed})")


def _rope_rows(rows, head_dim: int):
    """``rows`` (a tensor or QuantizedWeight of whole heads) in llama.cpp's rope layout; ``head_dim`` 1:
    no rope permutation."""
    if head_dim == 1:
        return rows
    order = rope_row_order(rows.shape[0], rows.shape[0] // head_dim)
    return rows.permute_rows(order) if isinstance(rows, QuantizedWeight) else rows[order]


def _rows_per_chunk(n_cols: int, multiple: int) -> int:
    """Rows of one written chunk: about ROW_CHUNK_BYTES of float32, a whole number of ``multiple``."""
    return max(multiple, (ROW_CHUNK_BYTES // (4 * n_cols)) // multiple * multiple)


def _float_bytes(t: torch.Tensor, ggml_type: GGMLType) -> np.ndarray:
    if ggml_type == GGMLType.F32:
        return t.numpy().astype(np.float32)
    if ggml_type == GGMLType.F16:
        return t.numpy().astype(np.float16)
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)


class Writer(gguf.GGUFWriter):
    """gguf-py's writer with metadata arrays of strings and numbers packed in one pass: a 128k-token
    vocabulary is ~400k values, which gguf-py packs one ``struct.pack`` call at a time (about a second)."""

    _ARRAYS = {GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.UINT32: "<u4"}

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if vtype != GGUFValueType.ARRAY or isinstance(val, bytes) or not val or self.endianess != GGUFEndian.LITTLE:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        item_type = sub_type if sub_type is not None else GGUFValueType.get_type(val[0])
        if not all(type(v) is type(val[0]) for v in val):  # mixed arrays: gguf-py's checks and errors
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        if item_type == GGUFValueType.STRING:
            encoded = [v.encode("utf-8") for v in val]
            items = b"".join(len(e).to_bytes(8, "little") + e for e in encoded)
        elif item_type in self._ARRAYS:
            items = np.asarray(val, dtype=self._ARRAYS[item_type]).tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        header = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", item_type, len(val))
        return header + items


def _write_tensor_chunks(writer: gguf.GGUFWriter, nbytes: int, chunks: Iterator[np.ndarray]) -> None:
    """``GGUFWriter.write_tensor_data`` for a tensor that arrives in chunks: aligned start, the chunks, padding."""
    fout = writer.fout[0]
    writer.tensors[0].pop(next(iter(writer.tensors[0])))  # the writer's queue of tensors still to write
    writer.write_padding(fout, fout.tell())
    written = 0
    for chunk in chunks:
        fout.write(np.ascontiguousarray(chunk).data)  # not tofile: its errors carry no errno (disk full?)
        written += chunk.nbytes
    if written != nbytes:
        raise RuntimeError(f"wrote {written} bytes for a tensor planned at {nbytes}")
    writer.write_padding(fout, written)
    writer.state = WriterState.WEIGHTS


class GGUFTarget(Target):
    kind = "gguf"
    takes_budget = True

    def __init__(self, option: str | None):
        # aliases resolve to llama.cpp's file type (gguf:Q4_K is Q4_K_M, as in llama-quantize)
        self.file_type = resolve(option or "Q8_0")
        super().__init__(self.file_type.name)
        self._budget_label: str | None = None  # set by configure for --target-bpw / --max-size runs

    def configure(self, recipe: Recipe) -> None:
        self._budget_label = recipe.budget_label() if recipe.budgeted else None

    @property
    def type_name(self) -> str:
        return self.option

    def grid(self, recipe: Recipe) -> Grid | None:
        """The grid of the file type's base type (None for float files)."""
        return GGUF_GRIDS.get(self.file_type.base)

    def bits_per_weight(self, recipe: Recipe) -> float:
        grid = self.grid(recipe)
        return grid.bits_per_weight() if grid else FLOAT_BITS[self.type_name]

    def filename(self) -> str:
        """``model-Q4_K_M.gguf``; under a budget ``model-Q4_K_M-4.20bpw.gguf`` (the file type's fixed tensors,
        budgeted block matrices)."""
        suffix = f"-{self._budget_label}" if self._budget_label else ""
        return f"model-{self.type_name}{suffix}.gguf"

    def runtime(self) -> dict:
        try:
            import llama_cpp
        except ImportError:
            return {"name": "llama.cpp (llama-cpp-python)", "version": None}
        return {"name": "llama.cpp (llama-cpp-python)", "version": llama_cpp.__version__}

    # ---- planning -------------------------------------------------------------------------------
    def chooser(self, source: ModelSource, recipe: Recipe) -> TypeChooser | None:
        """llama.cpp's type choice for this file and recipe; None for float files, which take no options."""
        if not self.file_type.quantized:
            return None
        n_head = hparam(source.config, "num_attention_heads")
        n_kv = source.config.get("num_key_value_heads") or n_head
        facts = ModelFacts(source.n_layers, n_head // n_kv, source.tied_embeddings,
                           source.arch.is_70b(source.n_layers, source.config),
                           imatrix=recipe.imatrix not in (None, "none"),
                           n_expert=source.arch.experts.count(source.config) if source.arch.experts else 0)
        embd, out = recipe.token_embedding_type, recipe.output_tensor_type
        return TypeChooser(self.file_type, facts, recipe.pure, [parse_override(s) for s in recipe.tensor_types],
                           override_type(embd, "--token-embedding-type") if embd else None,
                           override_type(out, "--output-tensor-type") if out else None)

    def plan(self, source: ModelSource, recipe: Recipe) -> GGUFPlan:
        """Every tensor of the file with its GGUF type; overrides and fallbacks become report notes."""
        arch, cfg = source.arch, source.config
        norms = arch.norm_weights(source.n_layers) if arch.norm_offset else set()
        chooser = self.chooser(source, recipe)
        float_type = GGMLType[self.file_type.base] if chooser is None else GGMLType.F16
        fallbacks: dict[tuple[int, str, str], list[str]] = {}  # (row length, wanted, written) -> names
        decided: dict[str, list[str]] = {}  # option -> tensors it typed
        chosen_names: list[str] = []

        floats = {f"{arch.block(i)}{n}.weight" for i in range(source.n_layers) for n in arch.float_tensors}

        def entry(hf: str, name: str, rope_heads: int | None = None, layer: int | None = None,
                  parts: tuple[str, ...] = ()) -> PlannedTensor:
            shape = source.tensors[hf].shape
            if parts:
                shape = (len(parts), *shape)
            if len(shape) == 1 or hf in floats:  # norms, biases and routers stay F32, as llama.cpp expects
                return PlannedTensor(name, hf, shape, GGMLType.F32, None,
                                     offset=arch.norm_offset if hf in norms else 0.0)
            if chooser is None or any(fnmatch.fnmatch(hf, p) for p in recipe.exclude):
                return PlannedTensor(name, hf, shape, float_type, None, rope_heads, parts=parts)
            chosen_names.append(name)
            choice = chooser.choose(name, layer, shape[-1])
            if choice.by:
                decided.setdefault(choice.by, []).append(name)
            if choice.fallback_from:
                fallbacks.setdefault((shape[-1], choice.fallback_from, choice.type), []).append(name)
            return PlannedTensor(name, hf, shape, GGMLType[choice.type], GGUF_GRIDS.get(choice.type), rope_heads,
                                 parts=parts)

        # computed tensors first, where llama.cpp's converter puts them (rope_freqs, rope_factors_long/short)
        plan = [PlannedTensor(name, "", (len(values),), GGMLType.F32, None, values=tuple(values))
                for name, values in arch.gguf_extra_tensors(cfg)]
        plan.append(entry(arch.embedding, "token_embd.weight"))
        for i in range(source.n_layers):
            prefix = arch.block(i)
            for gguf_rel, hf_rels in arch.gguf_block_tensors():
                hf_rel = hf_rels[0]
                heads = arch.rope_heads(hf_rel, cfg)
                parts = tuple(f"{prefix}{n}.weight" for n in hf_rels) if len(hf_rels) > 1 else ()
                plan.append(entry(f"{prefix}{hf_rel}.weight", f"blk.{i}.{gguf_rel}.weight", heads, i, parts))
                if hf_rel in arch.biased_linears:
                    plan.append(entry(f"{prefix}{hf_rel}.bias", f"blk.{i}.{gguf_rel}.bias", heads))
        plan.append(entry(arch.final_norm, "output_norm.weight"))
        if not source.tied_embeddings:
            plan.append(entry(arch.lm_head, "output.weight"))
        if chooser is not None and chosen_names:
            check_overrides_used(chooser, chosen_names, decided)
        notes = override_notes(decided) + [fallback_note(*key, names) for key, names in fallbacks.items()]
        return GGUFPlan(tuple(plan), tuple(notes))

    def validate(self, ctx: ExportContext) -> None:
        plan = self.plan(ctx.source, ctx.recipe)
        chooser = self.chooser(ctx.source, ctx.recipe)
        needing = [t.gguf_name for t in plan if chooser and chooser.needs_imatrix(t.gguf_name, t.ggml_type.name)]
        if needing and not chooser.facts.imatrix:
            raise QuantkitError(f"gguf:{self.type_name} needs an importance matrix: llama.cpp builds its Q2_K block "
                                f"matrices ({needing[0]}, ...) only from one; pass --imatrix or use gguf:Q2_K")
        ctx.source.arch.check_gguf(ctx.source.config)
        read_vocab(ctx.source.path, _tokenizer_config(ctx.source.path), _embedding_rows(ctx.source))
        if ctx.recipe.budgeted:
            if chooser is None:
                raise QuantkitError(f"a size budget chooses quantized types; {self.name} is a float file, so use a "
                                    "quantized file type (e.g. gguf:Q4_K_M) with --target-bpw / --max-size")
            self._budget_frame(plan, ctx.source).check(ctx.recipe, self.name)

    def _budget_frame(self, plan: GGUFPlan, source: ModelSource) -> BudgetFrame:
        return gguf_budget.frame(plan, self._block_linears(plan, source), self._header_bytes(source, plan))

    def _header_bytes(self, source: ModelSource, plan: GGUFPlan) -> int:
        """Bytes before the tensor data (metadata and tensor infos do not depend on the tensors' types)."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="quantkit-gguf-header-") as folder:
            writer = self._header(Path(folder) / "header.gguf", source, plan)
            size = writer.fout[0].tell()
            writer.close()
        return -(-size // writer.data_alignment) * writer.data_alignment

    def _header(self, path: Path, source: ModelSource, plan: GGUFPlan) -> Writer:
        """A writer with the header, metadata and tensor infos of ``plan`` written to ``path``."""
        writer = Writer(str(path), arch=source.arch.gguf_arch)
        self._write_metadata(writer, source)
        for t in plan:
            if t.ggml_type in (GGMLType.F32, GGMLType.F16):
                np_dtype = np.float32 if t.ggml_type == GGMLType.F32 else np.float16
                writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np_dtype), t.nbytes())
            else:
                writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), t.nbytes(), raw_dtype=t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        return writer

    @staticmethod
    def _block_linears(plan: GGUFPlan, source: ModelSource) -> list[PlannedTensor]:
        linears = {n for i in range(source.n_layers) for n in source.arch.linear_weights(i)}
        return [t for t in plan if t.hf_name in linears and t.grid is not None]

    def _grid_plan(self, plan: GGUFPlan, ctx: ExportContext) -> GridPlan | None:
        """The grid of every quantized block linear, when the file type gives them more than one."""
        base = self.grid(ctx.recipe)
        others = tuple((name, t.grid) for t in self._block_linears(plan, ctx.source) if t.grid != base
                       for name in t.hf_names)
        return GridPlan(base, others) if base is not None and others else None

    # ---- export ---------------------------------------------------------------------------------
    def export(self, ctx: ExportContext, path: Path) -> ExportReport:
        """Header and tensor infos first (sizes follow from the plan), then each tensor streamed in row
        chunks: read, rounded (or taken from the method's result) and written before the next chunk."""
        source = ctx.source
        plan = self.plan(source, ctx.recipe)
        budget = None
        if ctx.recipe.budgeted:
            plan, budget = self._budgeted(plan, ctx, path)
        writer = self._header(path, source, plan)
        grids = self._grid_plan(plan, ctx)
        for t in tqdm(plan, desc=f"write {path.name}", unit="tensor", disable=not ctx.progress, leave=False):
            _write_tensor_chunks(writer, t.nbytes(), self._tensor_chunks(ctx, t, grids))
        writer.close()
        if budget is None:
            return ExportReport(plan.notes)
        return ExportReport(plan.notes, bits_per_weight=budget["bits_per_weight"], budget=budget)

    def _budgeted(self, plan: GGUFPlan, ctx: ExportContext, path: Path) -> tuple[GGUFPlan, dict]:
        """The plan with the budget's types for the block matrices; the manifest entry; the sensitivity plot."""
        frame = self._budget_frame(plan, ctx.source)
        plan, allocation = gguf_budget.allocate_plan(plan, frame, ctx.recipe, ctx.quantizer, ctx.source, ctx.progress)
        plot = gguf_budget.plot(allocation, ctx.source.n_layers, path.with_suffix(".budget.png"))
        note, entry = frame.report(allocation, ctx.recipe, plot)
        return replace(plan, notes=(*plan.notes, note)), entry

    def _tensor_chunks(self, ctx: ExportContext, t: PlannedTensor, grids: GridPlan | None) -> Iterator[np.ndarray]:
        """The tensor's bytes in row chunks, rows in llama.cpp's rope layout where it needs one; a stack of
        experts' matrices is each expert's bytes in turn (llama.cpp quantizes a 3-D tensor matrix by matrix)."""
        if t.values:
            yield np.asarray(t.values, dtype=np.float32)
            return
        if t.parts:
            for part in t.parts:
                yield from self._tensor_chunks(ctx, replace(t, hf_name=part, shape=t.shape[1:], parts=()), grids)
            return
        head = t.shape[0] // t.rope_heads if t.rope_heads else 1
        rounding = ctx.quantizer.rounding(t.hf_name, t.grid) if t.grid is not None else None
        if t.grid is not None and rounding is None:  # the method's result (GPTQ, AWQ): already in memory
            qw = ctx.quantize(t.hf_name, t.grid, grids)
            for start in range(0, t.shape[0], _rows_per_chunk(t.shape[1], head)):
                part = qw.rows(start, start + _rows_per_chunk(t.shape[1], head))
                yield t.grid.to_bytes(_rope_rows(part, head))
            return
        replaced = ctx.quantizer.replaced(t.hf_name, self.grid(ctx.recipe), grids) if t.grid is None else None
        if replaced is not None or len(t.shape) == 1:
            chunks = [(0, replaced if replaced is not None else ctx.source.load(t.hf_name))]
        else:
            chunks = ctx.source.row_chunks(t.hf_name, multiple=head)
        for _, rows in chunks:
            rows = _rope_rows(rows, head) if rows.ndim == 2 else rows + t.offset
            if t.grid is not None:
                yield t.grid.round_to_bytes(rows, rounding.importance)
            else:
                yield _float_bytes(rows, t.ggml_type)

    def _write_metadata(self, w: gguf.GGUFWriter, source: ModelSource) -> None:
        vocab = read_vocab(source.path, _tokenizer_config(source.path), _embedding_rows(source))
        w.add_name(gguf_model_name(source.path.name if not source.is_default else "quantkit-default", vocab))
        w.add_quantized_by("quantkit")
        source.arch.write_gguf_hparams(w, source.config, source.n_layers)
        w.add_file_type(self.file_type.ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model(vocab.model)
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.token_types)
        if vocab.merges:
            w.add_token_merges(vocab.merges)
        if vocab.scores is not None:
            w.add_token_scores(vocab.scores)
        special_vocab(source.path, vocab).add_to_gguf(w, quiet=True)  # ids, add_bos/eos, the chat template
        if vocab.add_space_prefix is not None:
            w.add_add_space_prefix(vocab.add_space_prefix)

    # ---- runtime --------------------------------------------------------------------------------
    def _load(self, path: Path, n_ctx: int):
        return load_llama(path, n_ctx)

    def logits(self, path: Path, ids: torch.Tensor, progress: bool = True) -> Iterator[RowLogits]:
        """Each row's logits, decoded by llama.cpp as positions are asked for (``np.asarray`` for all of them);
        valid until the next row is asked for."""
        llm = self._load(path, ids.shape[1])
        try:
            for row in tqdm(ids, desc=f"llama.cpp {path.name}", unit="seq", disable=not progress, leave=False):
                yield RowLogits(llm, row.tolist())
        finally:
            llm.close()

    def remedies(self, recipe: Recipe) -> list[str]:
        tips = []
        if recipe.method == "rtn":
            tips.append("--method gptq (learns from --calib text; the largest gain at 4 bits and below)")
            if recipe.imatrix == "none":
                tips.append("--imatrix calib (llama.cpp's importance matrix, from --calib text)")
        more = MORE_BITS.get(self.file_type.name)
        if more:
            tips.append(f"a file type with more bits, e.g. gguf:{more}")
        return tips

    def verify_tokenizer(self, path: Path, tokenizer, texts: list[str]) -> dict:
        llm = self._load(path, 64)
        mismatched, tokens, first = 0, 0, None
        try:
            for text in texts:
                ours = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
                theirs = list(tokenizer.encode(text, add_special_tokens=False))
                tokens += len(theirs)
                if ours != theirs:
                    mismatched += 1
                    first = first or first_difference(text, theirs, ours, tokenizer)
        finally:
            llm.close()
        result = {"texts": len(texts), "tokens": tokens, "mismatched_texts": mismatched, "match": mismatched == 0}
        if first:
            result["first_mismatch"] = first
        return result


# The next file type up, suggested when an artifact fails its gate.
MORE_BITS = {"Q2_K": "Q3_K_M", "Q2_K_S": "Q3_K_M", "Q3_K_S": "Q3_K_M", "Q3_K_M": "Q4_K_M", "Q3_K_L": "Q4_K_M",
             "Q4_0": "Q4_K_M", "Q4_1": "Q5_K_M", "Q4_K_S": "Q4_K_M", "Q4_K_M": "Q5_K_M", "Q5_0": "Q5_K_M",
             "Q5_1": "Q6_K", "Q5_K_S": "Q5_K_M", "Q5_K_M": "Q6_K", "Q6_K": "Q8_0"}
CONTEXT_TOKENS = 4  # tokens shown on either side of the first difference
UBATCH = 128


def first_difference(text: str, hf: list[int], runtime: list[int], tokenizer) -> dict:
    """The first position where the two tokenizations part, with a few tokens either side, as strings."""
    at = next((i for i, (a, b) in enumerate(zip(hf, runtime, strict=False)) if a != b), min(len(hf), len(runtime)))
    lo = max(0, at - CONTEXT_TOKENS)

    def window(ids: list[int]) -> list[str]:
        return [tokenizer.decode([i]) for i in ids[lo : at + CONTEXT_TOKENS]]

    prefix = tokenizer.decode(hf[:lo])
    snippet = tokenizer.decode(hf[lo : at + CONTEXT_TOKENS])
    return {"text": snippet, "offset": len(prefix), "hf": window(hf), "runtime": window(runtime)}


class RowLogits:
    """One row's logits from llama.cpp, decoded through its KV cache as positions are asked for, in order.

    ``Llama.eval`` decodes the whole row and copies every position's logits into its ``scores`` array, and
    llama.cpp's output buffer holds them all too: two positions x vocabulary float buffers, the largest of a
    run. Here each slice decodes just the tokens it needs (continuing the cache) and is a view of llama.cpp's
    output buffer, which then holds one slice. This drives the same internals ``eval`` does
    (llama-cpp-python 0.3.36's ``_ctx`` / ``_batch``) and leaves ``scores`` untouched.
    """

    def __init__(self, llm, tokens: list[int]):
        self.llm, self.tokens, self.decoded = llm, tokens, 0
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, positions: slice) -> np.ndarray:
        start, stop, step = positions.indices(len(self.tokens))
        if step != 1 or start != self.decoded or stop <= start:
            raise IndexError(f"positions must be asked for in order: {self.decoded}: next, got {start}:{stop}")
        self.llm._batch.set_batch(batch=self.tokens[start:stop], n_past=start, logits_all=True)
        self.llm._ctx.decode(self.llm._batch)
        self.decoded = stop
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(stop - start, self.llm.n_vocab()))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The positions not asked for yet (all of them, on a fresh row), decoded and copied."""
        return np.array(self[self.decoded :], dtype=dtype)


def load_llama(path: Path, n_ctx: int):
    """A llama.cpp model that returns logits for every position."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise QuantkitError("llama-cpp-python is not installed; pip install 'quantkit[llama]'") from None
    try:
        with without_extra_buffer_types():
            # micro-batches of 128 tokens: the compute buffer holds one micro-batch's logits (same results and
            # speed as one 512-token micro-batch, measured; 76 MB less at a 49k vocabulary)
            return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, UBATCH), logits_all=True,
                         verbose=False, n_threads=os.cpu_count() or 1, seed=0)
    except ValueError as exc:
        raise ArtifactLoadError(f"llama.cpp could not load {path.name} ({exc}; its reason is on stderr with "
                                "--verbose); inspect it with 'quantkit inspect'") from None


def _embedding_rows(source: ModelSource) -> int:
    return source.tensors[source.arch.embedding].shape[0]


def _tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise QuantkitError(f"{path} is not valid JSON; fix or re-save the tokenizer") from None
