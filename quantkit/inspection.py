"""``quantkit inspect``: what a GGUF file holds."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from quantkit.errors import QuantkitError

_LONG_ARRAY = 8

def _field_value(field):
    import gguf

    kinds = field.types
    if not kinds:
        return None
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        if len(field.data) > _LONG_ARRAY:
            return f"[{len(field.data)} items]"
        return [_scalar(field, i) for i in field.data]
    return _scalar(field, field.data[0])

def _scalar(field, index):
    import gguf

    part = field.parts[index]
    if field.types[-1] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    value = part.tolist()
    return value[0] if isinstance(value, list) and len(value) == 1 else value

def inspect_gguf(path: str | Path) -> dict:
    import gguf

    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"{path} does not exist or is not a file; pass a .gguf file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise QuantkitError(f"{path} is not a readable GGUF file ({exc}); check the path or re-export it") from None
    metadata = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = []
    by_type: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "elements": 0, "bytes": 0})
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape.tolist())]  # numpy order: rows first
        entry = {"name": t.name, "type": t.tensor_type.name, "shape": shape, "elements": int(t.n_elements),
                 "bytes": int(t.n_bytes), "bits_per_weight": round(8 * int(t.n_bytes) / int(t.n_elements), 3)}
        tensors.append(entry)
        agg = by_type[entry["type"]]
        agg["tensors"] += 1
        agg["elements"] += entry["elements"]
        agg["bytes"] += entry["bytes"]
    elements = sum(t["elements"] for t in tensors)
    tensor_bytes = sum(t["bytes"] for t in tensors)
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "metadata": metadata,
        "tensor_count": len(tensors),
        "elements": elements,
        "tensor_bytes": tensor_bytes,
        "bits_per_weight": round(8 * tensor_bytes / elements, 3) if elements else None,
        "by_type": {k: {**v, "bits_per_weight": round(8 * v["bytes"] / v["elements"], 3)}
                    for k, v in sorted(by_type.items())},
        "tensors": tensors,
    }

_PACKED = (".qweight", ".qzeros", ".scales", ".g_idx")


def inspect_hf_folder(path: str | Path) -> dict:
    """What an hf-gptq / hf-awq (or plain) checkpoint folder holds: its quantization config and tensors."""
    from quantkit.model import SAFETENSORS_DTYPE_BYTES, read_safetensors_header

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise QuantkitError(f"{path} has no config.json; pass a .gguf file or a Hugging Face checkpoint folder")
    config = json.loads(config_path.read_text())
    tensors = []
    for file in sorted(path.glob("*.safetensors")):
        for name, info in sorted(read_safetensors_header(file).items()):
            elements = 1
            for d in info["shape"]:
                elements *= d
            tensors.append({"name": name, "dtype": info["dtype"], "shape": info["shape"],
                            "bytes": elements * SAFETENSORS_DTYPE_BYTES.get(info["dtype"], 1)})
    quant = config.get("quantization_config") or {}
    by_name = {t["name"]: t for t in tensors}
    packed_bytes: dict[str, int] = defaultdict(int)
    for t in tensors:
        if t["name"].endswith(_PACKED):
            packed_bytes[t["name"].rsplit(".", 1)[0]] += t["bytes"]
    weights = sum(_weight_count(by_name, linear, quant) for linear in packed_bytes)
    return {
        "path": str(path),
        "architectures": config.get("architectures"),
        "quantization_config": quant or None,
        "tensor_count": len(tensors),
        "tensor_bytes": sum(t["bytes"] for t in tensors),
        "quantized_linears": len(packed_bytes),
        "quantized_bits_per_weight": round(8 * sum(packed_bytes.values()) / weights, 3) if weights else None,
        "tensors": tensors,
    }


def _weight_count(by_name: dict, linear: str, quant: dict) -> int:
    """in x out of a packed linear: GPTQ packs 32 / bits input rows per word, AWQ keeps one row per input."""
    rows, _ = by_name[f"{linear}.qweight"]["shape"]
    outputs = by_name[f"{linear}.scales"]["shape"][1]
    inputs = rows * 32 // quant.get("bits", 4) if quant.get("quant_method") == "gptq" else rows
    return inputs * outputs


def format_hf_folder(info: dict, all_tensors: bool = False) -> str:
    total = info["tensor_bytes"] / 2**20
    lines = [f"{info['path']}: {info['architectures']}, {info['tensor_count']} tensors, {total:.2f} MiB",
             f"quantization_config: {json.dumps(info['quantization_config'])}",
             f"quantized linears: {info['quantized_linears']}, {info['quantized_bits_per_weight']} bits/weight "
             "(codes, zeros, scales and g_idx included)"]
    if all_tensors:
        lines += ["", "tensors:"]
        width = max(len(t["name"]) for t in info["tensors"])
        for t in info["tensors"]:
            lines.append(f"  {t['name'].ljust(width)}  {t['dtype']:5s} {'x'.join(map(str, t['shape']))}")
    return "\n".join(lines)


def inspect_onnx_folder(path: str | Path) -> dict:
    """What an onnx / ort target folder holds: graph inputs and outputs, operators, MatMulNBits weights."""
    path = Path(path)
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    info: dict = {"path": str(path), "files": files}
    if "model.onnx" in files:
        import onnx

        model = onnx.load(str(path / "model.onnx"), load_external_data=False)
        graph = model.graph
        ops: dict[str, int] = defaultdict(int)
        for node in graph.node:
            ops[node.op_type] += 1
        quantized = [{a.name: a.i for a in node.attribute} for node in graph.node if node.op_type == "MatMulNBits"]
        info.update(format="onnx", opsets={o.domain or "ai.onnx": o.version for o in model.opset_import},
                    inputs=[i.name for i in graph.input], outputs=[o.name for o in graph.output],
                    operators=dict(sorted(ops.items())),
                    matmul_nbits={"count": len(quantized),
                                  "bits": sorted({q["bits"] for q in quantized}),
                                  "block_sizes": sorted({q["block_size"] for q in quantized}),
                                  "weights": sum(q["K"] * q["N"] for q in quantized)})
    elif "model.ort" in files:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path / "model.ort"), providers=["CPUExecutionProvider"])
        config = path / "required_operators.config"
        info.update(format="ort", inputs=[i.name for i in session.get_inputs()],
                    outputs=[o.name for o in session.get_outputs()],
                    required_operators=[line for line in config.read_text().splitlines()
                                        if line and not line.startswith("#")] if config.is_file() else None)
    else:
        raise QuantkitError(f"{path} has neither model.onnx nor model.ort; pass an onnx / ort target folder")
    return info


def format_onnx_folder(info: dict, all_tensors: bool = False) -> str:
    total = sum(info["files"].values()) / 2**20
    lines = [f"{info['path']}: {info['format']} folder, {total:.2f} MiB",
             "files: " + ", ".join(f"{name} ({size / 2**20:.2f} MiB)" for name, size in info["files"].items()),
             f"inputs: {', '.join(info['inputs'][:4])}{' ...' if len(info['inputs']) > 4 else ''}",
             f"outputs: {', '.join(info['outputs'][:2])}{' ...' if len(info['outputs']) > 2 else ''}"]
    if info["format"] == "onnx":
        q = info["matmul_nbits"]
        lines.append(f"MatMulNBits: {q['count']} linears, {q['weights'] / 1e6:.2f}M weights, bits {q['bits']}, "
                     f"block sizes {q['block_sizes']}")
        lines.append("operators: " + ", ".join(f"{op} x{n}" for op, n in info["operators"].items()))
    elif info["required_operators"]:
        lines += ["required operators:", *(f"  {line}" for line in info["required_operators"])]
    return "\n".join(lines)


def inspect_artifact(path: str | Path) -> tuple[dict, str]:
    """(info, kind) for a .gguf file, an onnx / ort folder or a checkpoint folder."""
    path = Path(path)
    if path.is_dir() and ((path / "model.onnx").is_file() or (path / "model.ort").is_file()):
        return inspect_onnx_folder(path), "onnx"
    if path.is_dir():
        return inspect_hf_folder(path), "hf"
    return inspect_gguf(path), "gguf"


def format_gguf(info: dict, all_tensors: bool = False) -> str:
    lines = [f"{info['path']}: {info['file_bytes'] / 2**20:.2f} MiB, {info['tensor_count']} tensors, "
             f"{info['elements'] / 1e6:.2f}M weights, {info['bits_per_weight']} bits/weight", "", "metadata:"]
    width = max((len(k) for k in info["metadata"]), default=0)
    lines += [f"  {k.ljust(width)}  {v}" for k, v in info["metadata"].items()]
    lines += ["", "by type:"]
    for kind, agg in info["by_type"].items():
        lines.append(f"  {kind:6s} {agg['tensors']:4d} tensors  {agg['elements'] / 1e6:8.3f}M weights  "
                     f"{agg['bytes'] / 2**20:8.2f} MiB  {agg['bits_per_weight']:.3f} bits/weight")
    if all_tensors:
        lines += ["", "tensors:"]
        name_w = max(len(t["name"]) for t in info["tensors"])
        for t in info["tensors"]:
            shape = "x".join(map(str, t["shape"]))
            lines.append(f"  {t['name'].ljust(name_w)}  {t['type']:6s} {shape:>12s}  {t['bits_per_weight']:.3f} bpw")
    return "\n".join(lines)

__all__ = ["format_gguf", "format_hf_folder", "format_onnx_folder", "inspect_artifact", "inspect_gguf",
           "inspect_hf_folder", "inspect_onnx_folder"]
