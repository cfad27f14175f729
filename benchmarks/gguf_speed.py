"""How fast quantkit quantizes one matrix to each GGUF type: its default engine (ggml's C quantizer through
ctypes, rows split over every core), its torch reference grids, ggml alone on one thread, and GPTQ on the
same grid — next to round-to-nearest, per linear.

    python benchmarks/gguf_speed.py --rows 1024 --cols 4096   # writes benchmarks/results/gguf_speed.{md,json}

For each type: a matrix of Gaussian weights, without and with an importance matrix. "quantkit" is
``grid.round_to_bytes`` (what the GGUF writer calls: C speed where llama-cpp-python is installed);
"torch reference" is the same call under ``use_engine("torch")`` (the step-for-step reimplementation the
tests hold against ggml); "ggml 1 thread" is one ``ggml_quantize_chunk`` call. GPTQ: ``gptq_quantize``
with a Hessian from 2048 random activations whose scales vary per column, block scales fitted by ggml's
weighted search on the Hessian diagonal (``--weighted-fit``, the default). The 7B estimate scales the
per-weight time to Llama-2-7B's 6.74 G weights. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import quantkit
from quantkit.calibrate import LinearStats
from quantkit.grids import GGUF_GRIDS
from quantkit.grids.ggml_lib import use_engine
from quantkit.methods.gptq import GPTQConfig, gptq_quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers
from quantkit_testing.ggml_reference import ggml_quantize  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K"]
WEIGHTS_7B = 6.74e9


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(type_name: str, w: torch.Tensor, importance: torch.Tensor | None, hessian: torch.Tensor | None) -> dict:
    grid = GGUF_GRIDS[type_name]
    if importance is not None and not grid.uses_importance:
        return {}
    ours = seconds(lambda: grid.round_to_bytes(w, importance))
    with use_engine("torch"):
        reference = seconds(lambda: grid.round_to_bytes(w, importance))
    imatrix = None if importance is None else importance.numpy()
    ggml = seconds(lambda: ggml_quantize(type_name, w.numpy(), imatrix))
    row = {"quantkit_s": round(ours, 3), "torch_reference_s": round(reference, 3), "ggml_1thread_s": round(ggml, 3),
           "quantkit_7b_min": round(ours / w.numel() * WEIGHTS_7B / 60, 2)}
    if hessian is not None:
        row["gptq_s"] = round(seconds(lambda: gptq_quantize(w, hessian, grid, GPTQConfig())), 2)
        row["gptq_7b_min"] = round(row["gptq_s"] / w.numel() * WEIGHTS_7B / 60, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=generator) * 0.02
    importance = torch.rand(args.cols, generator=generator) * 2
    x = torch.randn(2048, args.cols, generator=generator) * torch.linspace(0.1, 3.0, args.cols)
    stats = LinearStats.empty(args.cols)
    stats.add(x)
    rows = []
    for type_name in TYPES:
        row = {"type": type_name, "plain": measure(type_name, w, None, stats.gram),
               "imatrix": measure(type_name, w, importance, None)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| type | quantkit s | torch reference s | ggml 1 thread s | quantkit, 7B est. min | GPTQ s per linear "
             "| GPTQ, 7B est. min | with imatrix: quantkit s | torch reference s | ggml 1 thread s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, i = r["plain"], r["imatrix"]
        weighted = " | ".join(str(i.get(k, "-")) for k in ("quantkit_s", "torch_reference_s", "ggml_1thread_s"))
        lines.append(f"| {r['type']} | {p['quantkit_s']:.3f} | {p['torch_reference_s']:.2f} | "
                     f"{p['ggml_1thread_s']:.3f} | {p['quantkit_7b_min']:.2f} | {p['gptq_s']:.2f} | "
                     f"{p['gptq_7b_min']:.1f} | {weighted} |")
    command = ("python benchmarks/gguf_speed.py " + " ".join(sys.argv[1:])).strip()
    header = (f"# GGUF quantizer speed, {args.rows} x {args.cols} float32 matrix\n\nCommand: `{command}` (quantkit "
              f"{quantkit.__version__}, torch {torch.__version__} with {torch.get_num_threads()} threads, quantkit's "
              f"ggml calls on {os.cpu_count()} threads, Python {platform.python_version()}, {platform.machine()}; "
              "idle machine).\n\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_speed.md").write_text(header + "\n".join(lines) + "\n")
    (RESULTS / "gguf_speed.json").write_text(json.dumps({"command": command, "shape": [args.rows, args.cols],
                                                         "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
