"""``quantkit inspect``: what a GGUF file holds."""

from __future__ import annotations

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

__all__ = ["format_gguf", "inspect_gguf"]
