"""A Llama-style decoder with KV cache as an ONNX graph, built node by node from the checkpoint.

The graph follows the input/output names onnxruntime-genai and optimum use::

    input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
    past_key_values.N.key / .value (B, kv_heads, P, head_dim)
    -> logits (B, S, vocab), present.N.key / .value (B, kv_heads, P+S, head_dim)

Quantized linears are ``com.microsoft::MatMulNBits`` nodes whose packed codes, scales and zero
points are quantkit's own (no re-quantization); act-order weights get their columns sorted by group
and a ``Gather`` that permutes the activations the same way, because onnxruntime's ``g_idx`` input
is not reliable on CPU (wrong results with zero points, unsupported for 8 bit; measured with 1.32).
Everything else is standard ONNX (opset 21). Tensors are streamed to an external-data file while
the graph is built, so only one weight is in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from tqdm import tqdm

from quantkit.grids import QuantizedWeight
from quantkit.model import ModelSource

OPSET = 21
# What this graph can express beyond a Llama block (see Architecture.features); other families are refused.
FEATURES = frozenset({"linear biases", "q/k norms"})
MS_DOMAIN = "com.microsoft"
MATMUL_NBITS_BITS = (2, 4, 8)
MIN_BLOCK = 16
EXTERNAL_ALIGN = 64

ONNX_DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


@dataclass(frozen=True)
class DecoderShape:
    """The hyperparameters the graph needs, read from config.json."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    sliding_window: int | None

    @classmethod
    def from_config(cls, config: dict) -> DecoderShape:
        heads = config["num_attention_heads"]
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        return cls(layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   vocab=config["vocab_size"], rms_eps=float(config.get("rms_norm_eps", 1e-6)),
                   sliding_window=window)


def matmul_nbits_block(group_size: int, cols: int) -> int:
    """The MatMulNBits block size that carries a group of ``group_size`` columns (per channel and per
    tensor groups become the largest power-of-two block dividing the row, with repeated scales)."""
    return group_size if group_size > 0 else cols & -cols  # cols & -cols: largest power of two dividing cols


def block_size_problem(group_size: int, cols: int) -> str | None:
    block = matmul_nbits_block(group_size, cols)
    if block < MIN_BLOCK or block & (block - 1):
        return f"MatMulNBits needs blocks of a power of two >= {MIN_BLOCK} weights, got {block}"
    return None


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes along the last axis -> uint8, low bits first (MatMulNBits' layout)."""
    per_byte = 8 // bits
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), codes.dtype)], axis=-1)
    grouped = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


@dataclass
class MatMulNBitsWeight:
    """One linear in MatMulNBits form: B (N, blocks, blob), scales (N, blocks), optional packed zeros,
    and the input-column order (act-order) or None."""

    packed: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    column_order: np.ndarray | None
    bits: int
    block: int


def to_matmul_nbits(qw: QuantizedWeight, unsigned: tuple[torch.Tensor, torch.Tensor], group_size: int,
                    float_dtype: type) -> MatMulNBitsWeight:
    """Repack a quantized weight; ``unsigned`` is (codes in [0, 2^b), integer zeros (rows, groups))."""
    codes, zeros = unsigned
    rows, cols = qw.shape
    bits = qw.grid.bits
    block = matmul_nbits_block(group_size, cols)
    scales = qw.params.scale[..., 0].expand(rows, -1)
    zeros = zeros.expand(rows, -1)
    order = None
    if qw.g_idx is not None:
        order = torch.argsort(qw.g_idx, stable=True)
        counts = torch.bincount(qw.g_idx, minlength=scales.shape[1])
        if not bool((counts == group_size).all()):
            raise ValueError("act-order groups are not all of the group size; MatMulNBits cannot carry them")
        codes = codes[:, order]
    repeat = cols // block // scales.shape[1]  # > 1 for per-channel / per-tensor scales
    scales = scales.repeat_interleave(repeat, dim=1)
    zeros = zeros.repeat_interleave(repeat, dim=1)
    symmetric_zero = 2 ** (bits - 1)  # MatMulNBits' default zero point
    packed_zeros = None if bool((zeros == symmetric_zero).all()) else pack_codes(zeros.numpy(), bits)
    return MatMulNBitsWeight(
        packed=pack_codes(codes.numpy(), bits).reshape(rows, cols // block, block * bits // 8),
        scales=scales.numpy().astype(float_dtype), zeros=packed_zeros,
        column_order=None if order is None else order.numpy().astype(np.int64), bits=bits, block=block)


class GraphWriter:
    """Nodes, initializers streamed to an external-data file, and unique value names."""

    def __init__(self, data_path: Path):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.data_path = data_path
        self._data = data_path.open("wb")
        self._offset = 0
        self._counter = 0
        self._constants: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, domain: str = "", **attrs) -> str:
        out = self.fresh(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain or None, **attrs))
        return out

    def op_to(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def tensor(self, name: str, array: np.ndarray) -> str:
        """An initializer whose bytes go to the external-data file now."""
        array = np.ascontiguousarray(array)
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        raw = array.tobytes()
        pad = (-self._offset) % EXTERNAL_ALIGN
        self._data.write(b"\0" * pad)
        self._offset += pad
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(self._offset)),
                           ("length", str(len(raw)))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self._data.write(raw)
        self._offset += len(raw)
        self.initializers.append(proto)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars), inlined and shared."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh("const")
            self.initializers.append(onnx.numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def close(self) -> int:
        self._data.close()
        return self._offset


@dataclass
class DecoderParts:
    """Where the graph gets its tensors: float tensors by HF name, quantized linears by HF name."""

    source: ModelSource
    load: Callable[[str], torch.Tensor]
    quantized: Callable[[str], MatMulNBitsWeight]
    quantized_names: set[str]
    inv_freq: np.ndarray
    attention_scaling: float


class DecoderGraph:
    """Builds the decoder graph; ``float_dtype`` is the activation type (np.float32 or np.float16)."""

    def __init__(self, parts: DecoderParts, writer: GraphWriter, float_dtype: type):
        self.parts, self.g, self.dtype = parts, writer, float_dtype
        self.onnx_dtype = ONNX_DTYPES[float_dtype]
        self.shape = DecoderShape.from_config(parts.source.config)
        self.arch = parts.source.arch

    def build(self, name: str, progress: bool = False) -> onnx.ModelProto:
        g, s, arch = self.g, self.shape, self.arch
        embed = g.tensor(arch.embedding, self._float(arch.embedding))
        hidden = g.op("Gather", [embed, "input_ids"], "embeddings")
        cos, sin = self._rope_tables()
        mask = self._attention_bias()
        for i in tqdm(range(s.layers), desc=f"onnx graph {name}", unit="block", disable=not progress, leave=False):
            hidden = self._block(i, hidden, cos, sin, mask)
        normed = self._rms_norm(hidden, arch.final_norm)
        self._lm_head(normed, embed)
        return self._model(name)

    # -- inputs and tables ------------------------------------------------------------------------

    def _float(self, name: str) -> np.ndarray:
        return self.parts.load(name).float().numpy().astype(self.dtype)

    def _rope_tables(self) -> tuple[str, str]:
        """cos and sin (B, 1, S, head_dim) of HF's half-split rotary embedding at position_ids."""
        g = self.g
        positions = g.op("Cast", ["position_ids"], "positions", to=TensorProto.FLOAT)
        angles = g.op("Mul", [g.op("Unsqueeze", [positions, g.const([-1])]),
                              g.const(self.parts.inv_freq, np.float32)], "angles")
        angles = g.op("Concat", [angles, angles], "angles", axis=-1)
        tables = []
        for fn in ("Cos", "Sin"):
            table = g.op("Mul", [g.op(fn, [angles]), g.const(self.parts.attention_scaling, np.float32)])
            table = g.op("Cast", [table], to=self.onnx_dtype) if self.dtype != np.float32 else table
            tables.append(g.op("Unsqueeze", [table, g.const([1])], fn.lower()))
        return tables[0], tables[1]

    def _attention_bias(self) -> str:
        """(B, 1, S, P+S) float32: 0 where a query may attend a key, the lowest float elsewhere."""
        g = self.g
        total = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], "total_len")
        new = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], "new_len")
        past = g.op("Sub", [total, new], "past_len")
        keys = g.op("Range", [g.const(0), total, g.const(1)], "key_pos")
        queries = g.op("Unsqueeze", [g.op("Range", [past, total, g.const(1)], "query_pos"), g.const([1])])
        allowed = g.op("LessOrEqual", [keys, queries], "causal")  # (S, P+S)
        if self.shape.sliding_window:
            in_window = g.op("Greater", [keys, g.op("Sub", [queries, g.const(self.shape.sliding_window)])])
            allowed = g.op("And", [allowed, in_window], "windowed")
        padding = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const([1, 2])])], to=TensorProto.BOOL)
        allowed = g.op("And", [g.op("Unsqueeze", [allowed, g.const([0, 1])]), padding], "allowed")
        lowest = np.finfo(np.float32).min
        return g.op("Where", [allowed, g.const(0.0, np.float32), g.const(lowest, np.float32)], "attn_bias")

    # -- layers -----------------------------------------------------------------------------------

    def _rms_norm(self, x: str, weight_name: str) -> str:
        """HF's RMSNorm: statistics in fp32, then scaled by the weight in the activation type."""
        g = self.g
        x32 = x if self.dtype == np.float32 else g.op("Cast", [x], to=TensorProto.FLOAT)
        mean_square = g.op("ReduceMean", [g.op("Mul", [x32, x32]), g.const([-1])], keepdims=1)
        inv_rms = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean_square, g.const(self.shape.rms_eps,
                                                                                       np.float32)])])])
        normed = g.op("Mul", [x32, inv_rms])
        if self.dtype != np.float32:
            normed = g.op("Cast", [normed], to=self.onnx_dtype)
        return g.op("Mul", [normed, g.tensor(weight_name, self._float(weight_name))], "rms_norm")

    def _linear(self, x: str, module: str) -> str:
        g, weight_name = self.g, f"{module}.weight"
        rows, cols = self.parts.source.tensors[weight_name].shape
        if weight_name in self.parts.quantized_names:
            q = self.parts.quantized(weight_name)
            if q.column_order is not None:
                x = g.op("Gather", [x, g.tensor(f"{module}.column_order", q.column_order)], "act_order", axis=-1)
            inputs = [x, g.tensor(f"{module}.qweight", q.packed), g.tensor(f"{module}.scales", q.scales)]
            if q.zeros is not None:
                inputs.append(g.tensor(f"{module}.qzeros", q.zeros))
            y = g.op("MatMulNBits", inputs, module.rsplit(".", 1)[-1], domain=MS_DOMAIN, K=cols, N=rows,
                     bits=q.bits, block_size=q.block)
        else:
            y = g.op("MatMul", [x, g.tensor(f"{module}.weight_t", self._float(weight_name).T)],
                     module.rsplit(".", 1)[-1])
        bias = f"{module}.bias"
        if bias in self.parts.source.tensors:
            y = g.op("Add", [y, g.tensor(bias, self._float(bias))], "bias")
        return y

    def _block(self, i: int, hidden: str, cos: str, sin: str, bias: str) -> str:
        prefix = self.arch.block(i)
        normed = self._rms_norm(hidden, f"{prefix}{self.arch.norms[0]}.weight")
        hidden = self.g.op("Add", [hidden, self._attention(i, prefix, normed, cos, sin, bias)], "residual")
        normed = self._rms_norm(hidden, f"{prefix}{self.arch.norms[1]}.weight")
        return self.g.op("Add", [hidden, self._mlp(prefix, normed)], "residual")

    def _heads(self, x: str, n_heads: int) -> str:
        """(B, S, n*d) -> (B, n, S, d)."""
        g = self.g
        split = g.op("Reshape", [x, g.const([0, 0, n_heads, self.shape.head_dim])])
        return g.op("Transpose", [split], perm=[0, 2, 1, 3])

    def _rotate(self, x: str, cos: str, sin: str) -> str:
        """x * cos + rotate_half(x) * sin, with rotate_half(x) = concat(-x2, x1)."""
        g = self.g
        half = self.shape.head_dim // 2
        first = g.op("Slice", [x, g.const([0]), g.const([half]), g.const([-1])])
        second = g.op("Slice", [x, g.const([half]), g.const([self.shape.head_dim]), g.const([-1])])
        rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])], "rope")

    def _attention(self, i: int, prefix: str, x: str, cos: str, sin: str, bias: str) -> str:
        g, s = self.g, self.shape
        names = [f"{prefix}{n}" for n in self.arch.linears[:4]]  # q, k, v, o projections
        q = self._heads(self._linear(x, names[0]), s.heads)
        k = self._heads(self._linear(x, names[1]), s.kv_heads)
        if self.arch.qk_norms:  # per-head RMSNorm over head_dim before rope (Qwen3)
            q_norm, k_norm = (f"{prefix}{n}.weight" for n in self.arch.qk_norms)
            q, k = self._rms_norm(q, q_norm), self._rms_norm(k, k_norm)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        v = self._heads(self._linear(x, names[2]), s.kv_heads)
        keys = g.op_to("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
        values = g.op_to("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
        # Grouped-query attention without copying K/V: the query heads sharing a KV head are stacked
        # along the sequence axis, (B, heads, S, d) -> (B, kv_heads, rep*S, d), and the mask tiled to match.
        rep = s.heads // s.kv_heads
        grouped = g.op("Reshape", [q, g.const([0, s.kv_heads, -1, s.head_dim])])
        scores = g.op("MatMul", [grouped, g.op("Transpose", [keys], perm=[0, 1, 3, 2])], "scores")
        if self.dtype != np.float32:
            scores = g.op("Cast", [scores], to=TensorProto.FLOAT)  # softmax in fp32, as HF does
        scores = g.op("Mul", [scores, g.const(1.0 / math.sqrt(s.head_dim), np.float32)])
        tiled_bias = g.op("Tile", [bias, g.const([1, 1, rep, 1])]) if rep > 1 else bias
        probs = g.op("Softmax", [g.op("Add", [scores, tiled_bias])], "probs", axis=-1)
        if self.dtype != np.float32:
            probs = g.op("Cast", [probs], to=self.onnx_dtype)
        context = g.op("Reshape", [g.op("MatMul", [probs, values]), g.const([0, s.heads, -1, s.head_dim])])
        merged = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), g.const([0, 0, -1])])
        return self._linear(merged, names[3])

    def _mlp(self, prefix: str, x: str) -> str:
        g = self.g
        gate_name, up_name, down_name = (f"{prefix}{n}" for n in self.arch.linears[4:7])
        gate = self._linear(x, gate_name)
        activated = g.op("Mul", [gate, g.op("Sigmoid", [gate])], "silu")
        return self._linear(g.op("Mul", [activated, self._linear(x, up_name)]), down_name)

    def _lm_head(self, x: str, embed: str) -> None:
        g, head = self.g, self.arch.lm_head
        if head in self.parts.quantized_names:
            logits = self._linear(x, head.removesuffix(".weight"))
        elif head in self.parts.source.tensors:
            logits = g.op("MatMul", [x, g.tensor(f"{head}_t", self._float(head).T)])
        else:  # tied: reuse the embedding table, transposed once when the session is created
            logits = g.op("MatMul", [x, g.op("Transpose", [embed], perm=[1, 0])])
        g.op_to("Identity", [logits], "logits")

    def _model(self, name: str) -> onnx.ModelProto:
        s, t = self.shape, self.onnx_dtype
        batch, seq, past, total = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, [batch, seq])]
        outputs = [helper.make_tensor_value_info("logits", t, [batch, seq, s.vocab])]
        for i in range(s.layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", t,
                                                            [batch, s.kv_heads, past, s.head_dim]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", t,
                                                             [batch, s.kv_heads, total, s.head_dim]))
        graph = helper.make_graph(self.g.nodes, name, inputs, outputs, self.g.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                       helper.make_opsetid(MS_DOMAIN, 1)],
                                 producer_name="quantkit")
