"""The CPU / mobile targets (onnx, ort, executorch) on the embedded model, each scored in its own runtime.

    python benchmarks/targets.py            # writes benchmarks/results/targets.{md,json}

One `quantkit.ship` run per method (round-to-nearest, GPTQ) builds every target from the same
quantized integers (one method pass per grid) and scores each artifact from its runtime's logits on
the same evaluation ids (32 x 512 tokens) against the same fp32 transformers reference. The hf-gptq
row is the same integers loaded by transformers + gptqmodel, for comparison. For the onnx targets,
decode speed is greedy generation with the KV cache (64 new tokens after a 64-token prompt, 2 CPU
threads). Not part of CI: it takes a few minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import quantkit
from quantkit.model import ModelSource
from quantkit.targets.onnx import greedy_generate

RESULTS = Path(__file__).parent / "results"
METHODS = ("rtn", "gptq")


def targets() -> list[str]:
    names = ["hf-gptq", "onnx", "onnx:fp16", "ort"]
    if importlib.util.find_spec("executorch") is not None:
        names += ["executorch", "executorch:8da8w"]
    return names


def decode_tokens_per_second(model_file: Path) -> float:
    prompt = ModelSource().tokenizer()("import os\nimport sys\n\n\ndef main():\n" * 4)["input_ids"][:64]
    greedy_generate(model_file, prompt, 4)  # warm-up: session creation and first runs
    start = time.perf_counter()
    greedy_generate(model_file, prompt, 64)
    return 64 / (time.perf_counter() - start)


def run(method: str, eval_samples: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        result = quantkit.ship(targets=targets(), out=Path(tmp) / "out", method=method, eval_samples=eval_samples,
                               calib_samples=32, seq_len=512, runtime="transformers")
        for art in result.artifacts:
            folder = result.out_dir / art.path
            model_file = next((folder / f for f in ("model.onnx", "model.ort") if (folder / f).is_file()), None)
            rows.append({
                "method": method, "target": art.target, "bytes": art.bytes, "bits_per_weight": art.bits_per_weight,
                "runtime": art.runtime, **art.metrics, "verdict": art.verdict, "seconds": art.seconds,
                "decode_tokens_per_s": round(decode_tokens_per_second(model_file), 1) if model_file else None,
            })
        reference = result.reference["metrics"]["perplexity"]
    for row in rows:
        row["reference_perplexity"] = reference
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | target | runtime | size MiB | bpw | ppl | Δppl % | KLD | top-1 | export s | decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        runtime = " ".join(f"{k} {v}" for k, v in r["runtime"]["version"].items() if v)
        speed = f"{r['decode_tokens_per_s']:.0f}" if r["decode_tokens_per_s"] else "-"
        lines.append(f"| {r['method']} | {r['target']} | {runtime} | {r['bytes'] / 2**20:.2f} | "
                     f"{r['bits_per_weight']:.2f} | {r['perplexity']:.3f} | {r['ppl_increase_pct']:+.2f} | "
                     f"{r['kld']:.5f} | {r['top1']:.4f} | {r['seconds']['export']:.1f} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-samples", type=int, default=32)
    args = parser.parse_args()
    rows = [row for method in METHODS for row in run(method, args.eval_samples)]
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/targets.py" + (f" --eval-samples {args.eval_samples}"
                                                 if args.eval_samples != 32 else "")
    header = (f"# CPU and mobile targets on the embedded model, 4-bit group 128 (sym)\n\nCommand: `{command}` "
              f"(quantkit {quantkit.__version__}, Python {platform.python_version()}). Each artifact is scored "
              f"from its own runtime's logits on {args.eval_samples} x 512 evaluation tokens against the fp32 "
              f"transformers reference (perplexity {rows[0]['reference_perplexity']:.4f}).\n\n")
    (RESULTS / "targets.md").write_text(header + table(rows) + "\n")
    (RESULTS / "targets.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    print(table(rows), file=sys.stdout)


if __name__ == "__main__":
    main()
