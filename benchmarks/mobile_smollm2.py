"""Mobile and edge artifacts on SmolLM2-135M (and the embedded model): the ExecuTorch KV-cache program, the
onnxruntime-genai folder and, beside them, the GGUF that llama.cpp runs.

    python benchmarks/mobile_smollm2.py SMOLLM2_DIR --calib PROSE_CALIB.txt --eval PROSE_EVAL.txt
    # writes benchmarks/results/mobile_smollm2.{md,json,jsonl}

Steps, each a real command, on an idle machine:
1. export cost: ``quantkit ship MODEL --targets executorch --group-size 64 --no-verify`` under
   ``/usr/bin/time -v`` (wall time, peak RSS), for SmolLM2 and the embedded model;
2. accuracy: ``quantkit ship SMOL --targets executorch,onnx-genai,gguf:Q4_K_M --method gptq --group-size 64``
   on the prose files, each artifact scored in its own runtime (manifest);
3. speed: ``quantkit bench`` over that output (pp128 / tg64) and over a full-sequence ``.pte`` of the same
   weights built with the previous export path (no KV cache: every decode step re-runs 256 positions);
4. generation: 32 greedy tokens from the quantized program (ExecuTorch runtime) and the genai folder
   (onnxruntime-genai) against transformers' on the unquantized model: how many leading tokens agree.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUANTKIT = [sys.executable, "-m", "quantkit.cli"]
WORKLOAD = ["--prompt-tokens", "128", "--gen-tokens", "64", "--repetitions", "3", "--warmup", "1"]


def run(command: list[str], allowed: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in allowed:
        sys.exit(f"failed ({done.returncode}): {done.stderr.strip()[-3000:]}")
    return done


def timed(command: list[str]) -> dict:
    """Wall seconds and peak RSS of a command, from /usr/bin/time -v."""
    err = run(["/usr/bin/time", "-v", *command]).stderr
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", err)
    hours, minutes, seconds = (float(g or 0) for g in wall.groups())
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    return {"seconds": round(hours * 3600 + minutes * 60 + seconds, 1), "peak_rss_mb": round(peak_kb / 1024)}


def export_cost(model: str | None, work: Path) -> dict:
    out = work / f"export-{'embedded' if model is None else 'smollm2'}"
    args = [*([model] if model else []), "--targets", "executorch", "--group-size", "64", "--no-verify",
            "--out", str(out), "--quiet"]
    cost = timed([*QUANTKIT, "ship", *args])
    pte = out / "executorch-8da4w" / "model.pte"
    return {**cost, "pte_mb": round(pte.stat().st_size / 2**20, 1), "command": "quantkit ship " + " ".join(args)}


def full_sequence_program(model: str, path: Path, seq_len: int) -> None:
    """The previous export path (transformers' module, one fixed-length forward, no cache), same weights."""
    from quantkit.model import ModelSource
    from quantkit.quiet import silenced
    from quantkit.recipe import Recipe, quantized_tensor_names
    from quantkit.targets.base import ExportContext
    from quantkit.targets.executorch import lower_to_xnnpack, quantized_model
    from quantkit.targets.registry import parse_target

    source = ModelSource(model)
    recipe = Recipe(group_size=64, seq_len=seq_len)
    ctx = ExportContext(source, recipe, quantized_tensor_names(source, recipe), progress=False)
    with silenced():
        program, _ = lower_to_xnnpack(quantized_model(ctx, parse_target("executorch").grid(recipe)), seq_len)
    path.write_bytes(program.buffer)


def shipped_summary(out: Path, ship: list[str]) -> dict:
    """The ship command, each artifact's size, metrics and verdict, and the reference metrics, from its manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    keys = ("target", "path", "bytes", "bits_per_weight", "metrics", "verdict", "failures")
    return {"ship_command": "quantkit ship " + " ".join(ship),
            "artifacts": [{k: a[k] for k in keys} for a in manifest["artifacts"]],
            "reference": manifest["reference"]["metrics"]}


def leading_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def generations(model: str, out: Path, prose: Path) -> dict:
    """32 greedy tokens from each runtime vs transformers' on the unquantized model, one prose prompt."""
    import numpy as np
    import onnxruntime_genai as og
    import torch

    from quantkit.bench.runners import ExecuTorchRunner
    from quantkit.model import ModelSource

    source = ModelSource(model)
    tokenizer = source.tokenizer()
    prompt = tokenizer.encode(prose.read_text()[:2000], add_special_tokens=False)[:64]
    with torch.no_grad():
        reference = source.hf_model().generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                               do_sample=False)[0, len(prompt):].tolist()
    paths = {a["target"]: out / a["path"] for a in json.loads((out / "manifest.json").read_text())["artifacts"]}
    runner = ExecuTorchRunner(paths["executorch:8da4w"], threads=2, n_ctx=len(prompt) + 33)
    pte = [runner.prefill(prompt)]
    for _ in range(31):
        pte.append(runner.step(pte[-1]))
    genai = og.Model(str(paths["onnx-genai"]))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(prompt) + 32, do_sample=False, batch_size=1)
    generator = og.Generator(genai, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    onnx = [int(t) for t in generator.get_sequence(0)][len(prompt):]
    return {"prompt_tokens": len(prompt),
            "executorch-8da4w": leading_agreement(pte, reference),
            "onnx-genai": leading_agreement(onnx, reference)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=None, help="reuse a previous run's folder: finished steps are kept")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mobile-"))
    saved = work / "export.json"
    if not saved.is_file():
        saved.write_text(json.dumps({"smollm2": export_cost(args.model, work), "embedded": export_cost(None, work)}))
    found: dict = {"export": json.loads(saved.read_text())}

    out = work / "ship"
    ship = [args.model, "--targets", "executorch,onnx-genai,gguf:Q4_K_M", "--method", "gptq", "--group-size", "64",
            "--calib", args.calib, "--eval", args.eval, "--eval-samples", "8", "--out", str(out), "--quiet", "--json"]
    if not (out / "manifest.json").is_file():  # exit 1: an artifact failed its gate (it is kept under rejected/)
        run([*QUANTKIT, "ship", *ship], allowed=(0, 1))
    found.update(shipped_summary(out, ship))

    jsonl = args.results / "mobile_smollm2.jsonl"
    run([*QUANTKIT, "bench", str(out), *WORKLOAD, "--json", str(jsonl)])
    baseline = work / "full-sequence-8da4w.pte"
    full_sequence_program(args.model, baseline, 256)
    baseline_jsonl = work / "baseline.jsonl"
    run([*QUANTKIT, "bench", str(baseline), *WORKLOAD, "--json", str(baseline_jsonl)])
    measurements = [json.loads(line) for path in (jsonl, baseline_jsonl) for line in path.read_text().splitlines()]
    found["bench"] = [{"artifact": Path(m["artifact"]["path"]).name, "runtime": m["artifact"]["runtime"],
                       "prefill_tok_s": m["metrics"]["prefill_tok_s"]["median"],
                       "decode_tok_s": m["metrics"]["decode_tok_s"]["median"],
                       "peak_rss_mb": m["metrics"]["peak_rss_mb"], "threads": m["threads"]}
                      for m in measurements if m.get("type") == "measurement"]
    found["generation"] = generations(args.model, out, Path(args.eval))
    (args.results / "mobile_smollm2.json").write_text(json.dumps(found, indent=2) + "\n")
    print(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()
