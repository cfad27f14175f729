"""Every GGUF type quantkit writes, by round-to-nearest and by GPTQ, on the embedded model, scored in llama.cpp.

    python benchmarks/gguf_types.py            # writes benchmarks/results/gguf_types.{md,json}

One `quantkit.ship` run builds all types (one reference pass), then each quantized file is compared
tensor by tensor with what llama.cpp's own quantizer (llama_model_quantize) makes from our F32 file
with the same tensors quantized. Not part of CI: it takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import gguf
import llama_cpp

import quantkit
from quantkit.grids import GGUF_GRIDS
from quantkit.targets.gguf_mixes import FILE_TYPES

# llama.cpp's file types (Q2_K_S needs an importance matrix and is left out)
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
         "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]
RESULTS = Path(__file__).parent / "results"


def llama_cpp_reference(f32: Path, dst: Path, gguf_type: str) -> tuple[Path, float]:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    start = time.time()
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {gguf_type}")
    return dst, time.time() - start


def identical_quantized_tensors(ours: Path, theirs: Path) -> tuple[int, int]:
    """(identical, compared) over the tensors our file quantized."""
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    compared = [n for n, t in a.items() if t.tensor_type.name in GGUF_GRIDS]
    same = sum(a[n].tensor_type == b[n].tensor_type and a[n].data.tobytes() == b[n].data.tobytes() for n in compared)
    return same, len(compared)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        common = dict(eval_samples=args.eval_samples, calib_samples=args.calib_samples, seq_len=args.seq_len,
                      progress=True, verbose=True)
        rtn_out, gptq_out = Path(tmp) / "rtn", Path(tmp) / "gptq"
        result = quantkit.ship(targets=[f"gguf:{t}" for t in TYPES], out=rtn_out, method="rtn", **common)
        gptq_types = [t for t in TYPES if getattr(GGUF_GRIDS.get(FILE_TYPES[t].base), "column_encodable", False)]
        gptq = quantkit.ship(targets=[f"gguf:{t}" for t in gptq_types], out=gptq_out, method="gptq", **common)
        wall = time.time() - started
        for method, run, out in (("rtn", result, rtn_out), ("gptq", gptq, gptq_out)):
            for art in run.artifacts:
                gguf_type = art.target.split(":")[1]
                row = {"type": gguf_type, "method": method, "bits_per_weight": art.bits_per_weight,
                       "bytes": art.bytes, **art.metrics, "verdict": art.verdict,
                       "export_s": art.seconds["export"], "verify_s": art.seconds["verify"]}
                if FILE_TYPES[gguf_type].quantized and method == "rtn":
                    theirs, seconds = llama_cpp_reference(rtn_out / "model-F32.gguf",
                                                          Path(tmp) / f"ref-{gguf_type}.gguf", gguf_type)
                    same, compared = identical_quantized_tensors(out / art.path, theirs)
                    row.update(identical_to_llama_cpp=f"{same}/{compared}", llama_cpp_quantize_s=round(seconds, 2))
                rows.append(row)

    ref = result.reference["metrics"]
    command = "python benchmarks/gguf_types.py " + " ".join(sys.argv[1:])
    payload = {"command": command.strip(), "quantkit": quantkit.__version__, "python": platform.python_version(),
               "llama_cpp_python": llama_cpp.__version__, "eval_tokens": args.eval_samples * args.seq_len,
               "calib_tokens": args.calib_samples * args.seq_len,
               "reference": ref, "rows": rows, "wall_seconds": round(wall, 1)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gguf_types.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.results / "gguf_types.md").write_text(to_markdown(payload))
    print(to_markdown(payload))


def to_markdown(p: dict) -> str:
    lines = [
        "# GGUF types on the embedded model, measured in llama.cpp",
        "",
        f"Command: `{p['command']}` (quantkit {p['quantkit']}, llama-cpp-python {p['llama_cpp_python']}, "
        f"Python {p['python']}). Evaluation: {p['eval_tokens']} tokens of the built-in eval split; reference "
        f"(transformers, fp32) perplexity {p['reference']['perplexity']:.3f}. GPTQ calibrates on "
        f"{p['calib_tokens']} tokens of the calib split. Every file type types every matrix (token embedding "
        "and output included) as llama.cpp's quantizer does for it. "
        "\"Same bytes\": quantized tensors identical to llama.cpp's `llama_model_quantize` output from our F32 "
        "file. Export time includes GPTQ's layer-by-layer pass; k-quant rounding runs in Python loops.",
        "",
        "| type | method | bits/weight | size (MiB) | ppl | Δppl % | KLD | top-1 | gate | same bytes as llama.cpp "
        "| export s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        lines.append(
            f"| {r['type']} | {r['method']} | {r['bits_per_weight']:.2f} | {r['bytes'] / 2**20:.2f} | "
            f"{r['perplexity']:.3f} | "
            f"{r['ppl_increase_pct']:+.2f} | {r['kld']:.5f} | {r['top1']:.4f} | {r['verdict']} | "
            f"{r.get('identical_to_llama_cpp', 'n/a')} | {r['export_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
