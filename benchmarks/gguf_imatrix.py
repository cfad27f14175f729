"""GGUF types with and without an importance matrix, on the embedded model, scored in llama.cpp.

    python benchmarks/gguf_imatrix.py          # writes benchmarks/results/gguf_imatrix.{md,json}

Two `quantkit.ship` runs build every type that has an importance-weighted quantizer (one type for
every quantized matrix): one with `--imatrix none`, one with `--imatrix calib` (collected from the
built-in calibration split, which never overlaps the evaluation split). Each imatrix file is also
compared tensor by tensor with what llama.cpp's own quantizer (llama_model_quantize, given the same
importance matrix) makes from our F32 file. Not part of CI: it takes a few minutes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

import quantkit
from quantkit.grids import GGUF_GRIDS
from quantkit.imatrix import GGUF_FILENAME, ImportanceMatrix, read_imatrix
from quantkit.recipe import Recipe

TYPES = ["Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K"]
LLAMA_FTYPE = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}  # llama.cpp names pure k-quant files by _M
RESULTS = Path(__file__).parent / "results"


def llama_quantize_with_imatrix(f32: Path, dst: Path, gguf_type: str, imatrix: ImportanceMatrix) -> Path:
    """llama.cpp's quantizer from our F32 file, given the importance values of our imatrix file."""
    values = {n: np.ascontiguousarray(imatrix.values(n), dtype=np.float32) for n in imatrix.entries}
    array = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()  # null-terminated
    for i, (name, v) in enumerate(values.items()):
        array[i].name, array[i].size = name.encode(), v.size
        array[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_FTYPE.get(gguf_type, gguf_type)}")
    params.pure = True  # every matrix of the type, as our files (below)
    params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {gguf_type}")
    return dst


def identical_quantized_tensors(ours: Path, theirs: Path) -> tuple[int, int]:
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
                      max_ppl_increase_pct=1000.0, max_kld=100.0, min_top1=0.0, progress=True, verbose=True)
        if "pure" in Recipe.__dataclass_fields__:  # one type per file, not llama.cpp's per-tensor mix rules
            common["pure"] = True
        runs = {}
        for imatrix in ("none", "calib"):
            out = Path(tmp) / imatrix
            targets = [f"gguf:{t}" for t in TYPES] + (["gguf:F32"] if imatrix == "calib" else [])
            runs[imatrix] = (quantkit.ship(targets=targets, out=out, imatrix=imatrix, **common), out)
        wall = time.time() - started
        matrix = read_imatrix(runs["calib"][1] / GGUF_FILENAME)
        f32 = next(runs["calib"][1] / a.path for a in runs["calib"][0].artifacts if a.target == "gguf:F32")
        for imatrix, (run, out) in runs.items():
            for art in run.artifacts:
                # a k-quant type may come back under llama.cpp's file type name (gguf:Q4_K is Q4_K_M)
                gguf_type = art.target.split(":")[1].removesuffix("_M")
                if gguf_type not in TYPES:
                    continue
                row = {"type": gguf_type, "imatrix": imatrix, "bits_per_weight": art.bits_per_weight,
                       "bytes": art.bytes, **art.metrics, "export_s": art.seconds["export"]}
                if imatrix == "calib":
                    theirs = llama_quantize_with_imatrix(f32, Path(tmp) / f"ref-{gguf_type}.gguf", gguf_type, matrix)
                    same, compared = identical_quantized_tensors(out / art.path, theirs)
                    row["identical_to_llama_cpp"] = f"{same}/{compared}"
                rows.append(row)

    ref = runs["none"][0].reference["metrics"]
    payload = {"command": ("python benchmarks/gguf_imatrix.py " + " ".join(sys.argv[1:])).strip(),
               "quantkit": quantkit.__version__, "python": platform.python_version(),
               "llama_cpp_python": llama_cpp.__version__, "eval_tokens": args.eval_samples * args.seq_len,
               "calib_tokens": args.calib_samples * args.seq_len, "reference": ref, "rows": rows,
               "wall_seconds": round(wall, 1)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gguf_imatrix.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.results / "gguf_imatrix.md").write_text(to_markdown(payload))
    print(to_markdown(payload))


def to_markdown(p: dict) -> str:
    by_key = {(r["type"], r["imatrix"]): r for r in p["rows"]}
    lines = [
        "# GGUF types with and without an importance matrix, on the embedded model, measured in llama.cpp",
        "",
        f"Command: `{p['command']}` (quantkit {p['quantkit']}, llama-cpp-python {p['llama_cpp_python']}, "
        f"Python {p['python']}). Evaluation: {p['eval_tokens']} tokens of the built-in eval split; reference "
        f"(transformers, fp32) perplexity {p['reference']['perplexity']:.3f}. The importance matrix is collected "
        f"from {p['calib_tokens']} tokens of the built-in calib split (disjoint from eval). Round-to-nearest "
        "throughout; every matrix of a file in its type (`--pure`; the token embedding, a lookup, is never "
        "weighted). \"Same bytes\": quantized tensors identical to llama.cpp's `llama_model_quantize` given the "
        "same importance matrix, from our F32 file.",
        "",
        "| type | ppl without | ppl with imatrix | Δppl % without → with | KLD without | KLD with | top-1 without "
        "| top-1 with | lower ppl | lower KLD | same bytes as llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pairs = [(t, by_key[(t, "none")], by_key[(t, "calib")]) for t in TYPES
             if (t, "none") in by_key and (t, "calib") in by_key]
    for gguf_type, a, b in pairs:
        lines.append(
            f"| {gguf_type} | {a['perplexity']:.3f} | {b['perplexity']:.3f} | {a['ppl_increase_pct']:+.2f} → "
            f"{b['ppl_increase_pct']:+.2f} | {a['kld']:.5f} | {b['kld']:.5f} | {a['top1']:.4f} | {b['top1']:.4f} | "
            f"{_yes(b['perplexity'] < a['perplexity'])} | {_yes(b['kld'] < a['kld'])} | "
            f"{b.get('identical_to_llama_cpp', 'n/a')} |")
    lower_ppl = sum(b["perplexity"] < a["perplexity"] for _, a, b in pairs)
    lower_kld = sum(b["kld"] < a["kld"] for _, a, b in pairs)
    lines += ["", f"With the importance matrix, KLD is lower for {lower_kld} of {len(pairs)} types and perplexity for "
              f"{lower_ppl} of {len(pairs)}."]
    return "\n".join(lines) + "\n"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


if __name__ == "__main__":
    main()
