"""The GPU check, one script (``benchmarks/gpu/run.sh`` calls it): kernels against their torch references on
the GPU, W4A16 / W8A8 throughput at Llama-3-8B layer shapes against torch fp16 and torch's int4 kernel (as a
share of HBM bandwidth), GPTQ on the GPU against the CPU, and vLLM serving quantkit's folders when vLLM is
installed. ``--dry-run`` runs every step on the CPU at small sizes (Triton's interpreter), so the script is
proven end to end before a GPU is lent; its figures mean nothing and are labelled so.

    python benchmarks/gpu/check.py [--dry-run] [--model HF_DIR] [--out benchmarks/results/gpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N) of Llama-3-8B's q/o, gate/up, down
BATCHES = [1, 16, 128]
GROUP = 128
HBM_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # published bandwidth
QUANTKIT = [sys.executable, "-m", "quantkit.cli"]


def timer(device: str):
    """Median milliseconds of a callable: triton's do_bench on a GPU, a plain clock on the CPU (dry run)."""
    if device == "cuda":
        import triton

        return lambda fn: triton.testing.do_bench(fn)

    def clock(fn):
        fn()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - start) / 3 * 1e3

    return clock


def kernel_correctness(device: str, small: bool) -> list[dict]:
    """Each Triton kernel against its torch reference on ``device`` (act-order GPTQ and AWQ layouts, 4 and 8
    bit, W8A8, group-wise quantize)."""
    import torch

    from quantkit.grids import IntGrid
    from quantkit.kernels import reference, w8a8
    from quantkit.kernels import w4a16 as tk
    from quantkit.kernels.quantize import quantize_groupwise
    from quantkit.methods import RoundToNearest
    from quantkit.packing import pack_along_columns, pack_along_rows

    rows = []
    gen = torch.Generator().manual_seed(0)
    k, n, m = (256, 128, 8) if small else (4096, 4096, 16)
    dtype = torch.float16 if device == "cuda" else torch.float32
    for layout, bits, act_order in (("gptq", 4, False), ("gptq", 4, True), ("gptq", 8, False), ("awq", 4, False)):
        codes = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
        zeros = torch.randint(0, 2**bits, (k // GROUP, n), generator=gen, dtype=torch.int32)
        scales = (torch.rand(k // GROUP, n, generator=gen) * 0.02).to(torch.float16)
        order = torch.randperm(k, generator=gen) if act_order else torch.arange(k)
        g_idx = (order // GROUP).to(torch.int32) if layout == "gptq" else None
        if layout == "gptq":
            qweight, qzeros = pack_along_rows(codes, bits), pack_along_columns(zeros, bits)
        else:
            order = (0, 2, 4, 6, 1, 3, 5, 7)
            qweight, qzeros = pack_along_columns(codes, bits, order), pack_along_columns(zeros, bits, order)
        args = [t.to(device) if t is not None else None for t in (qweight, qzeros, scales.to(dtype), g_idx)]
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        out = tk.w4a16_matmul(x, *args, layout, GROUP, bits=bits)
        ref = reference.w4a16_matmul(x.float().cpu(), *[a.cpu() if a is not None else None for a in args], layout,
                                     GROUP, bits).float()
        rel = float((out.float().cpu() - ref).abs().max() / ref.abs().max())
        rows.append({"kernel": f"w4a16 {layout} {bits}-bit{' act-order' if act_order else ''}", "rel_error": rel,
                     "ok": rel < 2e-3})
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    xq, xs = w8a8.quantize_per_token(x)
    rq, rs = w8a8.quantize_per_token_reference(x.float().cpu())
    rows.append({"kernel": "quantize per token (int8)", "rel_error": float((xq.cpu().int() - rq.int()).abs().max()),
                 "ok": bool((xq.cpu().int() - rq.int()).abs().max() <= 1)})
    wq = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
    ws = (torch.rand(n, generator=gen) * 0.01).to(device)
    out = w8a8.w8a8_matmul(xq, xs, wq, ws, out_dtype=torch.float32)
    ref = w8a8.w8a8_matmul_reference(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu(), torch.float32)
    rel = float((out.cpu() - ref).abs().max() / ref.abs().max())
    rows.append({"kernel": "w8a8 int8 GEMM", "rel_error": rel, "ok": rel < 1e-5})
    w = torch.randn(n, k, generator=gen) * 0.05
    grid = IntGrid(bits=4, group_size=GROUP, symmetric=False)
    got = quantize_groupwise(w.to(device), grid)
    want = RoundToNearest().quantize_weight(w, grid)
    mismatch = float((got.codes.cpu() != want.codes).float().mean())
    rows.append({"kernel": "group-wise quantize (4-bit asym)", "rel_error": mismatch, "ok": mismatch < 1e-3})
    return rows


def throughput(device: str, small: bool) -> list[dict]:
    """W4A16 (Triton) and W8A8 (Triton) against torch fp16 and torch's int4 weight-only kernel."""
    import torch

    from quantkit.kernels import reference, w8a8
    from quantkit.kernels import w4a16 as tk

    bench = timer(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    hbm = next((v for key, v in HBM_GBS.items() if key in name), None)
    dtype = torch.float16 if device == "cuda" else torch.float32
    rows = []
    for k, n in ([(256, 256)] if small else SHAPES):
        gen = torch.Generator().manual_seed(1)
        qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int32).to(device)
        qzeros = torch.randint(-(2**31), 2**31 - 1, (k // GROUP, n // 8), generator=gen, dtype=torch.int32).to(device)
        scales = (torch.rand(k // GROUP, n, generator=gen) * 0.01).to(device, dtype)
        g_idx = (torch.arange(k) // GROUP).to(torch.int32).to(device)
        w16 = reference.dequantize(qweight, qzeros, scales, g_idx, "gptq", GROUP, dtype)
        wq = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
        ws = (torch.rand(n, generator=gen) * 0.01).to(device)
        int4 = _torch_int4(w16, device)
        for m in ([1, 4] if small else BATCHES):
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            xq, xs = w8a8.quantize_per_token(x)
            weights = (qweight, qzeros, scales, g_idx)
            row = {"K": k, "N": n, "M": m,
                   "w4a16_ms": bench(lambda x=x, w=weights: tk.w4a16_matmul(x, *w, "gptq", GROUP)),
                   "fp16_ms": bench(lambda x=x, w16=w16: x @ w16.T),
                   "w8a8_ms": bench(lambda xq=xq, xs=xs, wq=wq, ws=ws: w8a8.w8a8_matmul(xq, xs, wq, ws)),
                   "torch_int4_ms": bench(lambda x=x, f=int4: f(x)) if int4 else None}
            w4_bytes = k * n // 2 + (k // GROUP) * n * 2.5 + 2 * m * (k + n)
            row["w4a16_gbs"] = w4_bytes / row["w4a16_ms"] / 1e6
            row["w4a16_hbm_share"] = row["w4a16_gbs"] / hbm if hbm else None
            row["w8a8_gbs"] = (k * n + 2 * m * (k + n)) / row["w8a8_ms"] / 1e6
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _torch_int4(w16, device: str):
    """torch's own int4 weight-only matmul (tinygemm) on the same weights, when this torch has it on CUDA."""
    import torch

    if device != "cuda" or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return None
    try:
        n, k = w16.shape[1], w16.shape[0]
        w = w16.T.float()  # (N, K)
        groups = w.reshape(n, k // GROUP, GROUP)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        codes = ((groups - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
        zeros = lo + 8 * scale
        scales_zeros = torch.stack([scale.squeeze(-1), zeros.squeeze(-1)], dim=-1).transpose(0, 1).contiguous()
        scales_zeros = scales_zeros.to(torch.bfloat16)
        return lambda x: torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), packed, GROUP, scales_zeros)
    except RuntimeError as exc:  # the packing API changed across torch versions
        print(f"torch int4 kernel unavailable: {exc}", file=sys.stderr)
        return None


def gptq_timing(model: str | None, device: str, work: Path) -> dict:
    """``quantkit ship --method gptq`` on the accelerator and on the CPU (export only)."""
    found = {}
    for where in dict.fromkeys([device, "cpu"]):
        out = work / f"gptq-{where}"
        command = [*QUANTKIT, "ship", *([model] if model else []), "--method", "gptq", "--targets", "hf-gptq",
                   "--no-verify", "--device", where, "--calib-samples", "8", "--out", str(out), "--quiet"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        found[where] = {"seconds": round(time.perf_counter() - start, 1), "command": " ".join(command[2:])}
    return found


def vllm_greedy(model: str | None, work: Path) -> dict:
    """vLLM serving quantkit's hf-gptq and ct folders: its greedy tokens against transformers'."""
    try:
        import vllm
    except ImportError:
        return {"skipped": "vllm is not installed here"}
    folders = {}
    for target in ("hf-gptq", "ct:w4a16", "ct:w8a8", "ct:fp8"):
        out = work / f"vllm-{target.replace(':', '-')}"
        subprocess.run([*QUANTKIT, "ship", *([model] if model else []), "--targets", target, "--no-verify",
                        "--out", str(out), "--quiet"], check=True, capture_output=True)
        folders[target] = next(p for p in out.iterdir() if p.is_dir())
    from quantkit.model import ModelSource

    tokenizer = ModelSource(model).tokenizer()
    prompt = tokenizer.encode("The history of the city begins", add_special_tokens=False)
    results = {}
    for target, folder in folders.items():
        llm = vllm.LLM(str(folder), enforce_eager=True, gpu_memory_utilization=0.3)
        params = vllm.SamplingParams(temperature=0, max_tokens=16)
        got = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids
        results[target] = {"tokens": list(got)}
        del llm
    return {"version": vllm.__version__, "results": results}


def to_markdown(report: dict) -> str:
    lines = [f"# GPU check on {report['device']}", "", f"Command: `{report['command']}`", ""]
    if report["dry_run"]:
        lines += ["**Dry run on the CPU (Triton interpreter, small shapes): these figures prove the script runs, "
                  "they measure nothing.**", ""]
    lines += ["## Kernels against their torch references", "", "| kernel | error | ok |", "|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['rel_error']:.2e} | {r['ok']} |" for r in report["correctness"]]
    lines += ["", "## Throughput (median ms)", "",
              "| K x N | M | W4A16 | fp16 | torch int4 | W8A8 | W4A16 GB/s | of HBM |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["throughput"]:
        int4 = f"{r['torch_int4_ms']:.4f}" if r["torch_int4_ms"] else "n/a"
        share = f"{100 * r['w4a16_hbm_share']:.0f} %" if r["w4a16_hbm_share"] else "n/a"
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['w4a16_ms']:.4f} | {r['fp16_ms']:.4f} | {int4} | "
                     f"{r['w8a8_ms']:.4f} | {r['w4a16_gbs']:.0f} | {share} |")
    lines += ["", "## GPTQ layer by layer", "", "| device | seconds |", "|---|---|"]
    lines += [f"| {d} | {v['seconds']} |" for d, v in report["gptq"].items()]
    lines += ["", "## vLLM", "", "```", json.dumps(report["vllm"], indent=2), "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every step on the CPU at small sizes")
    ap.add_argument("--model", default=None, help="HF folder for the GPTQ and vLLM steps (default: embedded)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.md")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run on a CPU")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "dry_run": args.dry_run, "command": "benchmarks/gpu/run.sh" + (" --dry-run" if args.dry_run else ""),
              "torch": torch.__version__}
    steps = (("correctness", lambda: kernel_correctness(device, args.dry_run)),
             ("throughput", lambda: throughput(device, args.dry_run)),
             ("gptq", lambda: gptq_timing(args.model, device, work)),
             ("vllm", lambda: vllm_greedy(args.model, work) if device == "cuda" else {"skipped": "dry run"}))
    for name, step in steps:
        start = time.perf_counter()
        report[name] = step()
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_markdown(report))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(to_markdown(report))
    sys.exit(0 if all(r["ok"] for r in report["correctness"]) else 1)


if __name__ == "__main__":
    main()
