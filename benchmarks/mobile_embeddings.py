"""The ExecuTorch program of SmolLM2 with a quantized embedding table (``--quantize-embeddings``): export cost
and size, and accuracy in the ExecuTorch runtime, beside the 16-bit-embedding numbers of mobile_smollm2.py.

    python benchmarks/mobile_embeddings.py SMOLLM2_DIR --calib PROSE_CALIB.txt --eval PROSE_EVAL.txt
    # writes benchmarks/results/mobile_embeddings.{json,md}

1. export cost: ``quantkit ship MODEL --targets executorch --group-size 64 --quantize-embeddings --no-verify``
   under ``/usr/bin/time -v`` (wall time, peak RSS) and the ``model.pte`` size; run alone on an idle machine;
2. accuracy: the same with ``--method gptq`` on the prose files, scored in the ExecuTorch runtime (manifest).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from mobile_smollm2 import QUANTKIT, RESULTS, run, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mobile-embeddings-"))
    export = [args.model, "--targets", "executorch", "--group-size", "64", "--quantize-embeddings", "--no-verify",
              "--out", str(work / "export"), "--quiet"]
    cost = timed([*QUANTKIT, "ship", *export])
    pte = work / "export" / "executorch-8da4w" / "model.pte"
    found = {"export_command": "quantkit ship " + " ".join(export), "export": {**cost, "pte_mib": round(
        pte.stat().st_size / 2**20, 1)}}
    ship = [args.model, "--targets", "executorch", "--method", "gptq", "--group-size", "64", "--quantize-embeddings",
            "--calib", args.calib, "--eval", args.eval, "--eval-samples", "8", "--out", str(work / "ship"), "--quiet"]
    run([*QUANTKIT, "ship", *ship], allowed=(0, 1))  # 1: rejected by its gate (kept under rejected/)
    manifest = json.loads((work / "ship" / "manifest.json").read_text())
    artifact = manifest["artifacts"][0]
    found["ship_command"] = "quantkit ship " + " ".join(ship)
    found["accuracy"] = {k: artifact[k] for k in ("bytes", "bits_per_weight", "metrics", "verdict", "failures")}
    found["reference"] = manifest["reference"]["metrics"]
    (RESULTS / "mobile_embeddings.json").write_text(json.dumps(found, indent=2) + "\n")
    m = artifact["metrics"]
    (RESULTS / "mobile_embeddings.md").write_text(
        "# SmolLM2-135M ExecuTorch program with a 4-bit embedding table\n\n"
        f"Commands: `{found['export_command']}` (timed alone, 2 cores) and `{found['ship_command']}`.\n\n"
        "| export wall s | peak RSS MiB | model.pte MiB | ppl | Δppl % | KLD | top-1 | verdict |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {cost['seconds']} | {cost['peak_rss_mb']} | {found['export']['pte_mib']} | {m['perplexity']:.3f} | "
        f"{m['ppl_increase_pct']:+.1f} | {m['kld']:.4f} | {m['top1']:.3f} | {artifact['verdict']} |\n\n"
        f"Reference perplexity (transformers fp32): {found['reference']['perplexity']:.3f}. Aims of issue 15: "
        "export <= 90 s, <= 1.5 GB, .pte <= 100 MB.\n")
    print(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()
