"""Every GGUF file type: llama.cpp's own quantizer against quantkit's (round-to-nearest, with an
importance matrix, and GPTQ), on the embedded model, every file scored in llama.cpp.

    python benchmarks/gguf_types.py            # writes benchmarks/results/gguf_types.{md,json}

One run: quantkit builds every type two ways (`--method rtn`, `--method rtn --imatrix calib`) and
GPTQ_TYPES a third (`--method gptq`); llama.cpp's per-tensor rules for each file type, token embedding and output
included). llama.cpp's quantizer (`llama_model_quantize`) makes the same file types from quantkit's
F32 file, without and with quantkit's importance matrix. Every file, ours and llama.cpp's, is loaded in
llama.cpp and scored on the same evaluation ids against the same fp32 transformers reference. "Same
bytes" compares our round-to-nearest files with llama.cpp's tensor by tensor. Times: quantkit's export
(for GPTQ including its layer-by-layer pass) and llama.cpp's quantize call; the imatrix collection
pass is not in them. Not part of CI: it takes several minutes on two cores.
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
from quantkit.checks import MetricAccumulator, score
from quantkit.data import make_samples
from quantkit.grids import GGUF_GRIDS
from quantkit.imatrix import GGUF_FILENAME, ImportanceMatrix, read_imatrix
from quantkit.model import ModelSource
from quantkit.streaming import BlockStreamer, streamed_logits
from quantkit.targets.gguf import GGUFTarget

FLOAT_TYPES = ["F32", "F16", "BF16"]
QUANTIZED_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_L",
                   "Q3_K_M", "Q3_K_S", "Q2_K"]
IMATRIX_ONLY = ["Q2_K_S"]
# GPTQ's layer-by-layer pass per file type is the slow part of this script: a representative subset
GPTQ_TYPES = ["Q6_K", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]  # llama.cpp refuses it without an importance matrix
RESULTS = Path(__file__).parent / "results"


def llama_imatrix_param(imatrix: ImportanceMatrix):
    """llama_model_quantize's imatrix argument (a null-terminated array) and the buffers it points into."""
    values = {n: np.ascontiguousarray(imatrix.values(n), dtype=np.float32) for n in imatrix.entries}
    array = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    for i, (name, v) in enumerate(values.items()):
        array[i].name, array[i].size = name.encode(), v.size
        array[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    return ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), (array, values)


def llama_quantize(f32: Path, dst: Path, gguf_type: str, imatrix: ImportanceMatrix | None) -> float:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    keep = None
    if imatrix is not None:
        params.imatrix, keep = llama_imatrix_param(imatrix)
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {gguf_type}")
    del keep
    return time.perf_counter() - start


def identical_quantized_tensors(ours: Path, theirs: Path) -> str:
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    compared = [n for n, t in a.items() if t.tensor_type.name in GGUF_GRIDS]
    same = sum(a[n].tensor_type == b[n].tensor_type and a[n].data.tobytes() == b[n].data.tobytes() for n in compared)
    return f"{same}/{len(compared)}"


class Scorer:
    """llama.cpp's logits of any GGUF file, scored like quantkit ship scores its artifacts."""

    def __init__(self, eval_samples: int, seq_len: int):
        source = ModelSource()
        self.samples = make_samples(source.tokenizer(), "builtin", "eval", eval_samples, seq_len)
        acc = MetricAccumulator()
        for i, (row, logits) in enumerate(zip(self.samples.ids, streamed_logits(BlockStreamer(source),
                                                                                self.samples.ids), strict=True)):
            acc.add(i, row, logits, keep=True)
        self.reference, self.reference_metrics = acc.logprobs, acc.result()

    def __call__(self, path: Path) -> dict:
        logits = GGUFTarget(None).logits(path, self.samples.ids, progress=False)
        return score(self.samples.ids, logits, self.reference, self.reference_metrics.perplexity).to_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()

    common = dict(eval_samples=args.eval_samples, calib_samples=args.calib_samples, seq_len=args.seq_len,
                  max_ppl_increase_pct=1000.0, max_kld=100.0, min_top1=0.0, progress=True, verbose=True)
    settings = {"rtn": (FLOAT_TYPES + QUANTIZED_TYPES, dict(method="rtn")),
                "rtn+imatrix": (QUANTIZED_TYPES[1:] + IMATRIX_ONLY, dict(method="rtn", imatrix="calib")),
                "gptq": (GPTQ_TYPES, dict(method="gptq"))}
    rows = []
    started = time.time()
    scorer = Scorer(args.eval_samples, args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for setting, (types, options) in settings.items():
            outs[setting] = Path(tmp) / setting
            run = quantkit.ship(targets=[f"gguf:{t}" for t in types], out=outs[setting], **options, **common)
            for art, gguf_type in zip(run.artifacts, types, strict=True):
                rows.append({"type": gguf_type, "quantizer": f"quantkit {setting}",
                             "bits_per_weight": art.bits_per_weight, "bytes": art.bytes, **art.metrics,
                             "quantize_s": art.seconds["export"], "path": str(outs[setting] / art.path)})
        f32 = outs["rtn"] / "model-F32.gguf"
        imatrix = read_imatrix(outs["rtn+imatrix"] / GGUF_FILENAME)
        for with_imatrix, types in ((False, QUANTIZED_TYPES), (True, QUANTIZED_TYPES[1:] + IMATRIX_ONLY)):
            label = "llama.cpp" + ("+imatrix" if with_imatrix else "")
            ours = {r["type"]: r for r in rows if r["quantizer"] == ("quantkit rtn+imatrix" if with_imatrix
                                                                       else "quantkit rtn")}
            for gguf_type in types:
                path = Path(tmp) / f"{label}-{gguf_type}.gguf"
                seconds = llama_quantize(f32, path, gguf_type, imatrix if with_imatrix else None)
                ours[gguf_type]["same_bytes_as_llama_cpp"] = identical_quantized_tensors(Path(ours[gguf_type]["path"]),
                                                                                         path)
                rows.append({"type": gguf_type, "quantizer": label, "bits_per_weight": ours[gguf_type]
                             ["bits_per_weight"], "bytes": path.stat().st_size, **scorer(path),
                             "quantize_s": round(seconds, 3)})
    for row in rows:
        row.pop("path", None)
    order = {t: i for i, t in enumerate(FLOAT_TYPES + QUANTIZED_TYPES + IMATRIX_ONLY)}
    quantizers = ["llama.cpp", "quantkit rtn", "llama.cpp+imatrix", "quantkit rtn+imatrix", "quantkit gptq"]
    rows.sort(key=lambda r: (order[r["type"]], quantizers.index(r["quantizer"])))
    payload = {"command": ("python benchmarks/gguf_types.py " + " ".join(sys.argv[1:])).strip(),
               "quantkit": quantkit.__version__, "python": platform.python_version(),
               "llama_cpp_python": llama_cpp.__version__, "eval_tokens": args.eval_samples * args.seq_len,
               "calib_tokens": args.calib_samples * args.seq_len, "reference": scorer.reference_metrics.to_dict(),
               "rows": rows, "wall_seconds": round(time.time() - started, 1)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gguf_types.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.results / "gguf_types.md").write_text(to_markdown(payload))
    print(to_markdown(payload))


def to_markdown(p: dict) -> str:
    lines = [
        "# GGUF file types on the embedded model: llama.cpp's quantizer and quantkit's, measured in llama.cpp",
        "",
        f"Command: `{p['command']}` (quantkit {p['quantkit']}, llama-cpp-python {p['llama_cpp_python']}, "
        f"Python {p['python']}). Evaluation: {p['eval_tokens']} tokens of the built-in eval split; reference "
        f"(transformers, fp32) perplexity {p['reference']['perplexity']:.3f}. The importance matrix and GPTQ's "
        f"statistics come from {p['calib_tokens']} tokens of the built-in calib split (disjoint from eval); "
        "the imatrix collection pass is not in the rows' times. Every file type types every "
        "matrix (token embedding and output included) by llama.cpp's rules. llama.cpp rows: "
        "`llama_model_quantize` from quantkit's F32 file (with quantkit's imatrix where marked), scored in "
        "llama.cpp like every other row. \"Same bytes\": quantkit's round-to-nearest tensors identical to "
        "llama.cpp's. Times: quantkit's export (GPTQ's includes its layer-by-layer pass) and llama.cpp's "
        "quantize call (C, multi-threaded), on two shared CPU cores.",
        "",
        "| type | quantizer | bits/weight | size (MiB) | ppl | Δppl % | KLD | top-1 | same bytes | quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        lines.append(f"| {r['type']} | {r['quantizer']} | {r['bits_per_weight']:.2f} | {r['bytes'] / 2**20:.2f} | "
                     f"{r['perplexity']:.3f} | {r['ppl_increase_pct']:+.2f} | {r['kld']:.5f} | {r['top1']:.4f} | "
                     f"{r.get('same_bytes_as_llama_cpp', '')} | {r['quantize_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
