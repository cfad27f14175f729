"""quantkit's onnx-genai folder (onnxruntime-genai's model builder over quantkit's integers) against the builder's
own int4 export of the same checkpoint, on SmolLM2-135M: export cost, size, speed in onnxruntime-genai and
accuracy scored the same way.

    python benchmarks/onnx_genai_builder.py SMOLLM2_DIR
    # writes benchmarks/results/onnx_genai_builder.{md,json}

Steps, each a real command, on an idle machine (2 threads for the runtime):
1. the builder's own export: ``python -m onnxruntime_genai.models.builder -i SMOL -o OUT -p int4 -e cpu``
   (its round-to-nearest int4, block 32, embedding and tied head quantized too), under GNU time;
2. quantkit: ``quantkit ship SMOL --targets onnx-genai --group-size 32 --no-verify`` (round to nearest, export
   cost), then ``--method gptq`` on the prose calibration text (accuracy);
3. accuracy of every folder with quantkit's scorer (onnxruntime-genai's generator logits against transformers
   fp32 on 8 x 512 prose tokens), the builder's folder included;
4. speed: ``quantkit bench`` over each folder (prompt 128, 64 generated, 3 repetitions).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# python puts this script's folder first on sys.path, where benchmarks/kernels.py would shadow the installed
# ``kernels`` package that transformers imports
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _real_models():
    """benchmarks/real_models.py by path: putting benchmarks/ on sys.path would let benchmarks/kernels.py shadow
    the installed ``kernels`` package transformers imports."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_models", Path(__file__).resolve().parent / "real_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


environment, prose, timed = (getattr(_real_models(), n) for n in ("environment", "prose", "timed"))

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUANTKIT = [sys.executable, "-m", "quantkit.cli"]
WORKLOAD = ["--prompt-tokens", "128", "--gen-tokens", "64", "--repetitions", "3", "--warmup", "1", "--threads", "2"]
EVAL_SAMPLES, SEQ_LEN = 8, 512


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def score_folder(model: Path, folder: Path, eval_text: Path) -> dict:
    """ppl / KLD / top-1 of the logits onnxruntime-genai computes from ``folder``, as quantkit's gate scores."""
    from quantkit.checks import score
    from quantkit.data import make_samples
    from quantkit.model import ModelSource
    from quantkit.reference import Reference
    from quantkit.targets.onnx_genai import OnnxGenaiTarget

    source = ModelSource(model)
    samples = make_samples(source.tokenizer(), str(eval_text), "eval", EVAL_SAMPLES, SEQ_LEN)
    with tempfile.TemporaryDirectory() as scratch:
        reference = Reference(source, samples, Path(scratch))
        try:
            metrics = score(samples.ids, OnnxGenaiTarget(None).logits(folder, samples.ids, progress=False),
                            reference, reference.metrics.perplexity)
        finally:
            reference.close()
    return {"perplexity": round(metrics.perplexity, 3), "reference_perplexity": round(reference.metrics.perplexity, 3),
            "ppl_increase_pct": round(metrics.ppl_increase_pct, 2), "kld": round(metrics.kld, 4),
            "top1": round(metrics.top1, 3)}


def bench(folder: Path, work: Path) -> dict:
    jsonl = work / f"{folder.name}.jsonl"
    subprocess.run([*QUANTKIT, "bench", str(folder), *WORKLOAD, "--json", str(jsonl)], check=True,
                   capture_output=True)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    m = next(r for r in records if r["type"] == "measurement")["metrics"]
    return {"prefill_tok_s": m["prefill_tok_s"]["median"], "decode_tok_s": m["decode_tok_s"]["median"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="genai-bench-"))
    calib, evals = prose(work)
    found: dict = {"environment": environment(), "threads": 2}
    builder_out = work / "builder-int4"
    found["builder_export"] = timed([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(args.model),
                                     "-o", str(builder_out), "-p", "int4", "-e", "cpu", "-c", str(work / "cache")])
    rtn = work / "rtn"
    found["quantkit_export"] = timed([*QUANTKIT, "ship", str(args.model), "--targets", "onnx-genai", "--group-size",
                                      "32", "--no-verify", "--out", str(rtn), "--quiet"])
    gptq = work / "gptq"
    subprocess.run([*QUANTKIT, "ship", str(args.model), "--targets", "onnx-genai,onnx-genai:fp32", "--method", "gptq",
                    "--group-size", "32", "--calib", str(calib), "--no-verify", "--out", str(gptq), "--quiet"],
                   check=True, capture_output=True)
    folders = {"builder int4 (its own RTN, embedding + head int4)": builder_out,
               "quantkit onnx-genai RTN g32": rtn / "model-onnx-genai",
               "quantkit onnx-genai GPTQ g32": gptq / "model-onnx-genai",
               "quantkit onnx-genai:fp32 GPTQ g32": gptq / "model-onnx-genai-fp32"}
    rows = []
    for label, folder in folders.items():
        rows.append({"artifact": label, "mib": round(folder_bytes(folder) / 2**20, 1),
                     **score_folder(args.model, folder, evals), **bench(folder, work)})
        print(rows[-1], flush=True)
    found["rows"] = rows
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "onnx_genai_builder.json").write_text(json.dumps(found, indent=2) + "\n")
    lines = ["# onnx-genai: quantkit's integers through onnxruntime-genai's builder vs the builder's own int4",
             "", "Command: `python benchmarks/onnx_genai_builder.py SMOLLM2_DIR` (SmolLM2-135M from "
             "`../shared/models/make_smollm2.py`), 2 threads, nothing else running. Raw: `onnx_genai_builder.json`.",
             "", f"Export: builder {found['builder_export']['seconds']} s, {found['builder_export']['peak_rss_mib']} "
             f"MiB peak; quantkit (RTN, --no-verify) {found['quantkit_export']['seconds']} s, "
             f"{found['quantkit_export']['peak_rss_mib']} MiB peak.", "",
             f"Accuracy on {EVAL_SAMPLES} x {SEQ_LEN} prose tokens (reference ppl {rows[0]['reference_perplexity']}); "
             "speed from `quantkit bench` (prompt 128, 64 generated, median of 3).", "",
             "| artifact | MiB | ppl | Δppl % | KLD | top-1 | prefill tok/s | decode tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['artifact']} | {r['mib']} | {r['perplexity']} | {r['ppl_increase_pct']:+} | {r['kld']} | "
                     f"{r['top1']} | {r['prefill_tok_s']} | {r['decode_tok_s']} |")
    (args.results / "onnx_genai_builder.md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
