"""quantkit's GPTQ and AWQ against gptqmodel's and llm-compressor's (and quantkit's round-to-nearest).

    GPTQMODEL_CPU_WORKERS=2 python benchmarks/peers.py [--llmcompressor-python VENV/bin/python]
    # the embedded model, 4 bit, group 128: writes benchmarks/results/peers.{md,json}
    GPTQMODEL_CPU_WORKERS=2 python benchmarks/peers.py --model SMOLLM2 --group-size 64 --settings asym \
        --calib PROSE_CALIB.txt --eval PROSE_EVAL.txt --name peers_smollm2 --llmcompressor-python ...

Every row quantizes the same model from the same calibration token ids, saves an HF checkpoint,
loads it with transformers + gptqmodel (the same loader for everyone) and is scored on the same
evaluation token ids against the same fp32 reference: perplexity, mean KLD, top-1 agreement.
Quantization time is the wall time of the quantize call (quantkit: model load, layer-by-layer pass,
packing and save, in a fresh process; gptqmodel: ``load`` + ``quantize`` + ``save``; llm-compressor:
``oneshot`` + ``save_pretrained``). CPU only; fp32 compute, except gptqmodel's AWQ, whose CPU
packer only takes bf16/fp16 models (the embedded model's weights are bf16 to begin with).

llm-compressor 0.14 caps transformers at 5.17, so it runs in its own virtual environment: pass its
interpreter with ``--llmcompressor-python``. Its rows are quantized, saved as compressed-tensors,
reloaded by transformers 5.17 in that environment (benchmarks/peer_llmcompressor.py), and their logits
are scored here like every other row. Each GPTQ column order is asked of every tool explicitly (see
SETTINGS): both peers reorder columns by default, llm-compressor even when its scheme asks for no ordering.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import quantkit
from quantkit.checks import MetricAccumulator, score
from quantkit.data import make_samples
from quantkit.model import ModelSource
from quantkit.targets.hf_checkpoint import hf_logits

RESULTS = Path(__file__).parent / "results"
# (method, sym, column order); round-to-nearest rows are quantkit's baseline on the same grid. GPTQ orders:
# off = columns in order; static = by decreasing Hessian diagonal, groups kept in column order (quantkit's and
# llm-compressor's default; gptqmodel's nearest is its default group-aware reordering, act_group_aware); group =
# groups follow the sweep (desc_act / g_idx; llm-compressor runs its "weight" ordering there)
SETTINGS = [
    ("rtn", True, "off"),
    ("rtn", False, "off"),
    ("gptq", True, "off"),
    ("gptq", True, "static"),
    ("gptq", True, "group"),
    ("gptq", False, "off"),
    ("gptq", False, "static"),
    ("gptq", False, "group"),
    ("awq", False, "off"),
]


def reference(source: ModelSource, ids: torch.Tensor):
    model = source.hf_model()
    acc = MetricAccumulator()
    with torch.no_grad():
        for i, row in enumerate(ids):
            acc.add(i, row, model(input_ids=row[None]).logits[0], keep=True)
    return acc.logprobs, acc.result().perplexity


def run_quantkit(args, method: str, sym: bool, order: str, out: Path) -> float:
    """``quantkit ship`` in a fresh process: gptqmodel, once imported, keeps worker threads that would
    slow whatever is timed after it in the same process. Its wall time, as for the peers, covers loading,
    calibration, quantization and saving (``--no-verify``: the checkpoint is scored here like theirs)."""
    target = "hf-awq" if method == "awq" else "hf-gptq"  # rtn rows use the GPTQ v1 layout too
    cmd = [sys.executable, "-m", "quantkit.cli", "ship", *([str(args.model)] if args.model else []),
           "--targets", target, "--out", str(out), "--method", method, "--scheme", "sym" if sym else "asym",
           "--bits", str(args.bits), "--group-size", str(args.group_size), "--calib", args.calib,
           "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len), "--no-verify", "--quiet",
           "--act-order", order]
    start = time.time()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.time() - start


def run_gptqmodel(args, method: str, sym: bool, order: str, out: Path, calib_ids: torch.Tensor) -> float:
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import FORMAT, METHOD

    kwargs = dict(bits=args.bits, group_size=args.group_size, sym=sym, desc_act=order == "group",
                  act_group_aware=order == "static", offload_to_disk=False)
    if method == "awq":
        kwargs.update(method=METHOD.AWQ, format=FORMAT.GEMM, desc_act=False, act_group_aware=False)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib_ids]
    start = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        # gptqmodel's CPU AWQ packer accepts only fp16/bf16 models; its GPTQ runs in fp32
        dtype = torch.bfloat16 if method == "awq" else torch.float32
        model = GPTQModel.load(str(ModelSource(args.model).path), QuantizeConfig(**kwargs), dtype=dtype)
        # AWQ on CPU needs the torch AWQ backend (its default kernel asks for CUDA)
        model.quantize(calibration, batch_size=1, backend=BACKEND.AWQ_TORCH if method == "awq" else BACKEND.AUTO)
        model.save(str(out))
    return time.time() - start


def run_llmcompressor(args, method: str, sym: bool, order: str, ids_file: Path, tmp: Path):
    out = tmp / f"llmc-{method}-{sym}-{order}.npz"
    script = Path(__file__).parent / "peer_llmcompressor.py"
    cmd = [args.llmcompressor_python, str(script), str(ids_file), str(out), method, "sym" if sym else "asym",
           order, str(ModelSource(args.model).path), str(args.bits), str(args.group_size)]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    result = np.load(out)
    return float(result["seconds"]), list(result["logits"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face folder (default: the embedded model)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--settings", default="all", help="all, or asym: the asymmetric rows only")
    ap.add_argument("--calib", default="builtin", help="calibration text, as quantkit ship --calib")
    ap.add_argument("--eval", default="builtin", help="evaluation text, as quantkit ship --eval")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--name", default="peers", help="results file name (results/NAME.md and .json)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--llmcompressor-python", default=None,
                    help="python of a virtual environment with llmcompressor 0.14 (adds its rows)")
    args = ap.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

    source = ModelSource(args.model)
    tokenizer = source.tokenizer()
    calib = make_samples(tokenizer, args.calib, "calib", args.calib_samples, args.seq_len)
    evals = make_samples(tokenizer, args.eval, "eval", args.eval_samples, args.seq_len)
    settings = SETTINGS if args.settings == "all" else [s for s in SETTINGS if not s[1]]
    ref_logprobs, ref_ppl = reference(source, evals.ids)
    rows = []
    peers = ("gptqmodel", "llm-compressor") if args.llmcompressor_python else ("gptqmodel",)
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.npz"
        np.savez(ids_file, calib=calib.ids.numpy(), eval=evals.ids.numpy())
        for method, sym, order in settings:
            for tool in ("quantkit",) if method == "rtn" else ("quantkit", *peers):
                out = Path(tmp) / f"{tool}-{method}-{sym}-{order}"
                if tool == "quantkit":
                    seconds = run_quantkit(args, method, sym, order, out)
                    logits = hf_logits(out / ("hf-awq" if method == "awq" else "hf-gptq"), evals.ids, False)
                elif tool == "gptqmodel":
                    seconds = run_gptqmodel(args, method, sym, order, out, calib.ids)
                    logits = hf_logits(out, evals.ids, progress=False)
                else:
                    seconds, logits = run_llmcompressor(args, method, sym, order, ids_file, Path(tmp))
                m = score(evals.ids, logits, ref_logprobs, ref_ppl)
                rows.append({"tool": tool, "method": method, "scheme": "sym" if sym else "asym",
                             "order": order, "quantize_s": round(seconds, 2), **m.to_dict()})
                print(json.dumps(rows[-1]), flush=True)

    command = "GPTQMODEL_CPU_WORKERS=2 python benchmarks/peers.py " + " ".join(sys.argv[1:])
    from importlib import metadata

    llmc = None
    if args.llmcompressor_python:
        probe = "from importlib import metadata; print(metadata.version('llmcompressor'))"
        llmc = subprocess.run([args.llmcompressor_python, "-c", probe], capture_output=True, text=True).stdout.strip()
    payload = {"command": command.strip(), "model": str(source.path.name) if args.model else "embedded",
               "bits": args.bits, "group_size": args.group_size, "quantkit": quantkit.__version__,
               "llmcompressor": llmc,
               "gptqmodel": metadata.version("gptqmodel"), "transformers": metadata.version("transformers"),
               "python": platform.python_version(), "reference_perplexity": round(ref_ppl, 4),
               "calib_tokens": calib.n_tokens, "eval_tokens": evals.n_tokens, "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.results / f"{args.name}.md").write_text(to_markdown(payload))
    print(to_markdown(payload))


def to_markdown(p: dict) -> str:
    lines = [
        f"# quantkit vs gptqmodel and llm-compressor: {p.get('bits', 4)}-bit, group size {p.get('group_size', 128)}, "
        f"{p.get('model', 'embedded')} model, CPU",
        "",
        f"Command: `{p['command']}` (quantkit {p['quantkit']}, gptqmodel {p['gptqmodel']}, llm-compressor "
        f"{p['llmcompressor'] or 'not run'}, transformers {p['transformers']}, Python {p['python']}). Same "
        f"calibration ids ({p['calib_tokens']} tokens) and evaluation ids ({p['eval_tokens']} tokens) for every row; "
        "quantkit's and gptqmodel's checkpoints loaded by transformers + gptqmodel, llm-compressor's "
        "compressed-tensors checkpoints by transformers 5.17 in its own environment; all scored against the same "
        f"fp32 reference (perplexity {p['reference_perplexity']}). Column order, asked of each tool explicitly: off "
        "(in order), static (by decreasing Hessian diagonal, groups in column order; gptqmodel's nearest is its "
        "default group-aware reordering), group (groups follow the sweep, g_idx; llm-compressor's \"weight\").",
        "",
        "| method | scheme | column order | tool | ppl | Δppl % | KLD | top-1 | quantize s (wall) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        order = r["order"] if r["method"] == "gptq" else "-"
        if r["tool"] == "gptqmodel" and order == "static":
            order = "group-aware (its default)"
        if r["tool"] == "llm-compressor" and order == "group":
            order = "weight"
        lines.append(f"| {r['method']} | {r['scheme']} | {order} | {r['tool']} | "
                     f"{r['perplexity']:.3f} | {r['ppl_increase_pct']:+.2f} | {r['kld']:.5f} | {r['top1']:.4f} | "
                     f"{r['quantize_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
