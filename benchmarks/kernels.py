"""W4A16 GEMM (Triton) against fp16 torch.matmul at Llama-3-8B / 70B linear shapes.

    python benchmarks/kernels.py              # on a CUDA GPU: writes benchmarks/results/kernels-<device>.{md,json}
    python benchmarks/kernels.py --dry-run    # anywhere: checks shapes, launch grids and configs

For K x N in {4096x4096, 4096x14336, 14336x4096, 8192x28672} and M in {1, 4, 16, 64, 256, 2048}:
time (triton.testing.do_bench), TFLOP/s, achieved GB/s (weight bytes + activations + output) against
the device's memory bandwidth, and speedup over fp16 torch.matmul on the dequantized weight. 4-bit
GPTQ layout, group size 128, no act-order. The dry run launches each row's config on a scaled-down
shape under Triton's interpreter, so it also proves the launch parameters are accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N)
MS = [1, 4, 16, 64, 256, 2048]
GROUP = 128
BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # published HBM bandwidth
RESULTS = Path(__file__).parent / "results"


def packed_weight(k: int, n: int, device: str):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=g, dtype=torch.int32)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // GROUP, n // 8), generator=g, dtype=torch.int32)
    scales = (torch.rand(k // GROUP, n, generator=g) * 0.01).to(torch.float16)
    g_idx = (torch.arange(k) // GROUP).to(torch.int32)
    return [t.to(device) for t in (qweight, qzeros, scales, g_idx)]


def weight_bytes(k: int, n: int) -> int:
    return k * n // 2 + (k // GROUP) * n * 2 + (k // GROUP) * n // 2 + k * 4


# The suite's fp16 bound (tests/test_kernels.py): both sides accumulate in fp32 and round the output to fp16
# once, so they differ by summation order plus half an fp16 ulp (2^-11) of the largest output.
FP16_TOLERANCE = 2e-3


def dry_run() -> list[dict]:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from quantkit.kernels import reference
    from quantkit.kernels import w4a16 as tk

    rows = []
    for k, n in SHAPES:
        for m in MS:
            config = tk.pick_config(m, table=tk.CUDA_CONFIGS)
            _, grid = tk.launch_plan(m, n, k, config)
            valid = min(config.block_m, config.block_n, config.block_k) >= 16 and k % GROUP == 0 and n % 8 == 0
            # the same config, launched on a scaled-down shape (interpreter cost grows with the grid)
            small_k, small_n, small_m = 2 * config.block_k * config.split_k, 2 * config.block_n, min(m, 32)
            args = packed_weight(small_k, small_n, "cpu")
            x = torch.randn(small_m, small_k).to(torch.float16)
            out = tk.w4a16_matmul(x, *args, "gptq", GROUP, config=config)
            ref = reference.w4a16_matmul(x, *args, "gptq", GROUP)
            error = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
            close = bool(error <= FP16_TOLERANCE)
            rows.append({"K": k, "N": n, "M": m, "config": config.__dict__, "grid": grid,
                         "weight_bytes": weight_bytes(k, n), "flops": 2 * m * n * k, "checked": valid and close})
    return rows


def gpu_run() -> tuple[str, list[dict]]:
    import torch
    import triton

    from quantkit.kernels import reference
    from quantkit.kernels import w4a16 as tk

    device = torch.cuda.get_device_name()
    bandwidth = next((v for key, v in BANDWIDTH_GBS.items() if key in device), None)
    rows = []
    for k, n in SHAPES:
        args = packed_weight(k, n, "cuda")
        w16 = reference.dequantize(*args, "gptq", GROUP, torch.float16)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ms = triton.testing.do_bench(lambda x=x, args=args: tk.w4a16_matmul(x, *args, "gptq", GROUP))
            ms16 = triton.testing.do_bench(lambda x=x, w16=w16: x @ w16.T)
            moved = weight_bytes(k, n) + 2 * m * (k + n)
            gbs = moved / ms / 1e6
            rows.append({"K": k, "N": n, "M": m, "ms": ms, "fp16_ms": ms16, "speedup": ms16 / ms,
                         "tflops": 2 * m * n * k / ms / 1e9, "gbs": gbs,
                         "bandwidth_share": gbs / bandwidth if bandwidth else None})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return device, rows


def to_markdown(device: str, rows: list[dict], command: str) -> str:
    lines = [f"# W4A16 GEMM vs fp16 torch.matmul on {device}", "", f"Command: `{command}`", "",
             "| K x N | M | W4A16 ms | fp16 ms | speedup | TFLOP/s | GB/s | of bandwidth |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = f"{100 * r['bandwidth_share']:.0f} %" if r["bandwidth_share"] else "n/a"
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['ms']:.4f} | {r['fp16_ms']:.4f} | {r['speedup']:.2f} | "
                     f"{r['tflops']:.1f} | {r['gbs']:.0f} | {share} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="check shapes and launch parameters on CPU")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args()
    if args.dry_run:
        rows = dry_run()
        print(json.dumps({"mode": "dry-run", "rows": rows}) if args.json else
              "\n".join(f"K={r['K']} N={r['N']} M={r['M']} grid={r['grid']} ok={r['checked']}" for r in rows))
        sys.exit(0 if all(r["checked"] for r in rows) else 1)
    device, rows = gpu_run()
    command = "python benchmarks/kernels.py"
    RESULTS.mkdir(exist_ok=True)
    name = device.replace(" ", "_")
    (RESULTS / f"kernels-{name}.json").write_text(json.dumps({"device": device, "command": command,
                                                              "rows": rows}, indent=2) + "\n")
    (RESULTS / f"kernels-{name}.md").write_text(to_markdown(device, rows, command))
    print(json.dumps(rows) if args.json else to_markdown(device, rows, command))


if __name__ == "__main__":
    main()
