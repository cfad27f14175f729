"""How fast quantkit's GGUF quantizers are, next to ggml's own C quantizer, on 7B-shaped matrices.

    python benchmarks/gguf_speed.py            # writes benchmarks/results/gguf_speed.{md,json}

For each type: one 4096 x 4096 matrix (Llama-2-7B's attention projections) of Gaussian weights,
quantized by quantkit (round-to-nearest: fit + encode + ggml block bytes) and by ggml's
``ggml_quantize_chunk`` (llama-cpp-python's libggml-base, single-threaded), without and with an
importance matrix. The 7B estimate scales the per-weight time to Llama-2-7B's 6.74 G weights.
The ggml reference helper lives in tests/ggml_reference.py (test and benchmark code only).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import quantkit
from quantkit.grids import GGUF_GRIDS
from quantkit.methods import RoundToNearest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.ggml_reference import ggml_quantize  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K"]
WEIGHTS_7B = 6.74e9


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(type_name: str, w: torch.Tensor, importance: torch.Tensor | None) -> dict:
    grid = GGUF_GRIDS[type_name]
    if importance is not None and not grid.uses_importance:
        return {}
    ours = seconds(lambda: grid.to_bytes(RoundToNearest().quantize_weight(w, grid, importance=importance)))
    imatrix = None if importance is None else importance.numpy()
    theirs = seconds(lambda: ggml_quantize(type_name, w.numpy(), imatrix))
    return {"quantkit_s": round(ours, 3), "ggml_s": round(theirs, 3),
            "quantkit_7b_min": round(ours / w.numel() * WEIGHTS_7B / 60, 1),
            "ggml_7b_min": round(theirs / w.numel() * WEIGHTS_7B / 60, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=generator) * 0.02
    importance = torch.rand(args.cols, generator=generator) * 2
    rows = []
    for type_name in TYPES:
        row = {"type": type_name, "plain": measure(type_name, w, None), "imatrix": measure(type_name, w, importance)}
        rows.append(row)
        print(row, flush=True)
    lines = ["| type | quantkit s | ggml s | quantkit, 7B est. min | ggml, 7B est. min | with imatrix: quantkit s | "
             "ggml s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p, i = r["plain"], r["imatrix"]
        lines.append(f"| {r['type']} | {p['quantkit_s']:.2f} | {p['ggml_s']:.3f} | {p['quantkit_7b_min']:.1f} | "
                     f"{p['ggml_7b_min']:.2f} | {i.get('quantkit_s', '-')} | {i.get('ggml_s', '-')} |")
    command = ("python benchmarks/gguf_speed.py " + " ".join(sys.argv[1:])).strip()
    header = (f"# GGUF quantizer speed, {args.rows} x {args.cols} float32 matrix\n\nCommand: `{command}` (quantkit "
              f"{quantkit.__version__}, torch {torch.__version__} with {torch.get_num_threads()} threads, ggml "
              f"single-threaded, Python {platform.python_version()}, {platform.machine()}).\n\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_speed.md").write_text(header + "\n".join(lines) + "\n")
    (RESULTS / "gguf_speed.json").write_text(json.dumps({"command": command, "shape": [args.rows, args.cols],
                                                         "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
