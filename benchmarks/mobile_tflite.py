"""The tflite (LiteRT) target on SmolLM2-135M and the embedded model, beside the mobile artifacts of
mobile_smollm2.py.

    python benchmarks/mobile_tflite.py SMOLLM2_DIR --calib PROSE_CALIB.txt --eval PROSE_EVAL.txt
    # writes benchmarks/results/mobile_tflite.{md,json,jsonl}
    python benchmarks/mobile_tflite.py SMOLLM2_DIR --calib ... --eval ... --quantize-embeddings --no-bench
    # the same with an int8 embedding table: benchmarks/results/mobile_tflite_embeddings.{md,json}

Steps, each a real command, on an idle machine:
1. export cost: ``quantkit ship MODEL --targets tflite --group-size 64 --no-verify`` under ``/usr/bin/time -v``
   (wall time, peak RSS; the float conversion included), for SmolLM2 and the embedded model;
2. accuracy: ``quantkit ship SMOL --targets tflite,tflite:8da8w --method gptq --group-size 64`` on the prose files,
   each file scored in LiteRT's interpreter (manifest);
3. speed: ``quantkit bench`` over that output (pp128 / tg64; the files have no KV cache, so every decode step
   re-runs the model over all --seq-len positions);
4. generation: 32 greedy tokens from each file (LiteRT) against transformers' on the unquantized model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from mobile_smollm2 import (  # noqa: E402
    QUANTKIT,
    RESULTS,
    WORKLOAD,
    leading_agreement,
    run,
    shipped_summary,
    timed,
)


def export_cost(model: str | None, work: Path, extra: list[str]) -> dict:
    out = work / f"export-{'embedded' if model is None else 'smollm2'}"
    args = [*([model] if model else []), "--targets", "tflite", "--group-size", "64", "--no-verify",
            "--out", str(out), "--quiet", *extra]
    cost = timed([*QUANTKIT, "ship", *args])
    model_file = out / "tflite-8da4w" / "model.tflite"
    return {**cost, "tflite_mb": round(model_file.stat().st_size / 2**20, 1),
            "command": "quantkit ship " + " ".join(args)}


def generations(model: str, out: Path, prose: Path) -> dict:
    import torch

    from quantkit.bench.runners import LiteRTRunner
    from quantkit.model import ModelSource

    source = ModelSource(model)
    prompt = source.tokenizer().encode(prose.read_text()[:2000], add_special_tokens=False)[:64]
    with torch.no_grad():
        reference = source.hf_model().generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                               do_sample=False)[0, len(prompt):].tolist()
    agreement = {"prompt_tokens": len(prompt)}
    for artifact in json.loads((out / "manifest.json").read_text())["artifacts"]:
        runner = LiteRTRunner(out / artifact["path"], threads=2, n_ctx=len(prompt) + 33)
        tokens = [runner.prefill(prompt)]
        for _ in range(31):
            tokens.append(runner.step(tokens[-1]))
        agreement[artifact["target"]] = leading_agreement(tokens, reference)
    return agreement


def report(found: dict) -> str:
    lines = ["# tflite (LiteRT) on SmolLM2-135M", "",
             f"Made by `python benchmarks/mobile_tflite.py SMOLLM2 --calib PROSE_CALIB --eval PROSE_EVAL "
             f"{found.get('options', '')}` on an idle 2-core machine (threads: 2).", "", "## Export cost", "",
             "| model | command | wall s | peak RSS MB | .tflite MiB |", "|---|---|---:|---:|---:|"]
    for name, cost in found["export"].items():
        lines.append(f"| {name} | `{cost['command']}` | {cost['seconds']} | {cost['peak_rss_mb']} | "
                     f"{cost['tflite_mb']} |")
    ref = found["reference"]["perplexity"]
    lines += ["", "## Accuracy in LiteRT's interpreter", "", f"`{found['ship_command']}`", "",
              f"Reference perplexity (transformers fp32): {ref:.3f}.", "",
              "| target | MiB | bpw | ppl | Δppl % | KLD | top-1 | verdict | greedy tokens equal to transformers' |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for a in found["artifacts"]:
        m = a["metrics"]
        lines.append(f"| {a['target']} | {a['bytes'] / 2**20:.1f} | {a['bits_per_weight']:.2f} | "
                     f"{m['perplexity']:.3f} | {m['ppl_increase_pct']:+.1f} | {m['kld']:.4f} | {m['top1']:.4f} | "
                     f"{a['verdict']} | "
                     f"{found['generation'].get(a['target'])} of 32 |")
    if not found.get("bench"):
        return "\n".join(lines) + "\n"
    lines += ["", "## Speed (`quantkit bench`, pp128 / tg64, no KV cache: each decode step re-runs all positions)", "",
              "| artifact | prefill tok/s | decode tok/s | peak RSS MB | threads |", "|---|---:|---:|---:|---:|"]
    for b in found["bench"]:
        lines.append(f"| {b['artifact']} | {b['prefill_tok_s']:.1f} | {b['decode_tok_s']:.2f} | "
                     f"{b['peak_rss_mb']:.0f} | {b['threads']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=None, help="reuse a previous run's folder: finished steps are kept")
    ap.add_argument("--quantize-embeddings", action="store_true", help="ship with an int8 embedding table")
    ap.add_argument("--no-bench", action="store_true", help="skip the speed step")
    args = ap.parse_args()
    extra = ["--quantize-embeddings"] if args.quantize_embeddings else []
    stem = "mobile_tflite_embeddings" if args.quantize_embeddings else "mobile_tflite"
    work = args.work or Path(tempfile.mkdtemp(prefix="tflite-"))
    saved = work / "export.json"
    if not saved.is_file():
        saved.write_text(json.dumps({"smollm2": export_cost(args.model, work, extra),
                                     "embedded": export_cost(None, work, extra)}))
    found: dict = {"export": json.loads(saved.read_text()),
                   "options": " ".join([*extra, *(["--no-bench"] if args.no_bench else [])])}

    out = work / "ship"
    ship = [args.model, "--targets", "tflite,tflite:8da8w", "--method", "gptq", "--group-size", "64",
            "--calib", args.calib, "--eval", args.eval, "--eval-samples", "8", "--out", str(out), "--quiet", "--json",
            *extra]
    if not (out / "manifest.json").is_file():  # exit 1: an artifact failed its gate (it is kept under rejected/)
        run([*QUANTKIT, "ship", *ship], allowed=(0, 1))
    found.update(shipped_summary(out, ship))
    if not args.no_bench:
        jsonl = args.results / f"{stem}.jsonl"
        run([*QUANTKIT, "bench", str(out), *WORKLOAD, "--json", str(jsonl)])
        found["bench"] = [{"artifact": Path(m["artifact"]["path"]).name, "runtime": m["artifact"]["runtime"],
                           "prefill_tok_s": m["metrics"]["prefill_tok_s"]["median"],
                           "decode_tok_s": m["metrics"]["decode_tok_s"]["median"],
                           "peak_rss_mb": m["metrics"]["peak_rss_mb"], "threads": m["threads"]}
                          for m in map(json.loads, jsonl.read_text().splitlines()) if m.get("type") == "measurement"]
    found["generation"] = generations(args.model, out, Path(args.eval))
    (args.results / f"{stem}.json").write_text(json.dumps(found, indent=2) + "\n")
    (args.results / f"{stem}.md").write_text(report(found))
    print(report(found))


if __name__ == "__main__":
    main()
