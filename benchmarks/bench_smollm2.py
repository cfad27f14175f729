"""``quantkit bench`` on SmolLM2-135M: every artifact kind it can bench, the decode figure against
llama.cpp's own counters (and llama-bench, when built), and ``bench compare`` on a deliberately slowed run.

    python benchmarks/bench_smollm2.py SMOLLM2_DIR [--eval PROSE.txt] [--llama-bench PATH]
    # writes benchmarks/results/bench_smollm2.{md,jsonl,html} (+ the threads-1 and repeat runs' JSONL) and
    # bench_report.png (the HTML report rendered by headless Chromium)

Steps, each a real command: ``quantkit ship SMOL --targets gguf:Q4_K_M,gguf:Q8_0,onnx,ort,hf-gptq --group-size 64
--bench --bench-json R/bench_smollm2.jsonl`` (threads = every usable core), then ``quantkit bench OUT``
again at the same threads (the noise run) and at 1 thread (the slowed run), then ``quantkit bench compare``
of the first run with each. llama-bench (``benchmarks/llama_tools.py --build-only`` builds it from
llama-cpp-python's source distribution) measures the same GGUF files at the same threads.
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUANTKIT = [sys.executable, "-m", "quantkit.cli"]
WORKLOAD = ["--prompt-tokens", "128,512", "--gen-tokens", "128", "--repetitions", "5", "--warmup", "1"]


def run(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode:
        sys.exit(f"failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def llama_bench(binary: str, gguf: Path, threads: int) -> list[dict]:
    """llama-bench's prefill (pp128, pp512) and decode at the depths our decode runs at (tg128 after a 128- and
    a 512-token prompt: ``-d``), same threads and repetitions."""
    # --repack 0: quantkit's runners load GGUF with llama.cpp's extra (repacking) buffer types off, as its
    # checks do (with them this llama.cpp build segfaults on these files, in llama-bench too)
    common = [binary, "-m", str(gguf), "-t", str(threads), "-r", "5", "--repack", "0", "-o", "json"]
    prefill = json.loads(run([*common, "-p", "128,512", "-n", "0"]).stdout)
    decode = json.loads(run([*common, "-p", "0", "-n", "128", "-d", "128,512"]).stdout)
    return prefill + decode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--eval", default="builtin")
    ap.add_argument("--calib", default="builtin")
    ap.add_argument("--llama-bench", default=None, help="llama-bench binary (built from llama-cpp-python's sdist)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    from quantkit.bench.runners import cpu_count

    threads = cpu_count()
    args.results.mkdir(parents=True, exist_ok=True)
    first, again, slowed = (args.results / f"bench_smollm2{s}.jsonl" for s in ("", "_repeat", "_threads1"))
    html = args.results / "bench_smollm2.html"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        ship = [*QUANTKIT, "ship", args.model, "--targets", "gguf:Q4_K_M,gguf:Q8_0,onnx,ort,hf-gptq",
                "--group-size", "64",
                "--eval", args.eval, "--calib", args.calib, "--out", str(out), "--quiet", "--bench",
                "--bench-json", str(first), "--bench-html", str(html), "--threads", str(threads), *WORKLOAD,
                # gates off: this measures speed; round-to-nearest onnx/ort fail the default gate on SmolLM2
                # (their accuracy is still measured and reported)
                "--max-ppl-increase", "1000", "--max-kld", "100", "--min-top1", "0"]
        shipped = run(ship)
        run([*QUANTKIT, "bench", str(out), "--json", str(again), "--threads", str(threads), *WORKLOAD])
        run([*QUANTKIT, "bench", str(out), "--json", str(slowed), "--threads", "1", *WORKLOAD])
        same = run([*QUANTKIT, "bench", "compare", str(first), str(again)], check=False)
        slow = run([*QUANTKIT, "bench", "compare", str(first), str(slowed)], check=False)
        reference = {g.name: llama_bench(args.llama_bench, g, threads) for g in sorted(out.glob("*.gguf"))} \
            if args.llama_bench else {}
    screenshot(html, args.results / "bench_report.png")
    write_report(args, threads, shipped.stdout, records(first), same, slow, reference)


def screenshot(page: Path, png: Path) -> None:
    """The report as headless Chromium renders it (the check that the page works in a real browser)."""
    run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}",
         "--window-size=1100,2600", page.as_uri()])


def counter_agreement(measurements: list[dict]) -> list[str]:
    rows = ["| artifact | test | quantkit decode tok/s | llama.cpp counters tok/s | difference |",
            "|---|---|---|---|---|"]
    for m in measurements:
        if "runtime_decode_tok_s" not in m["metrics"]:
            continue
        ours, theirs = m["metrics"]["decode_tok_s"]["median"], m["metrics"]["runtime_decode_tok_s"]["median"]
        w = m["workload"]
        rows.append(f"| {m['artifact']['name']} | pp{w['prompt_tokens']}+tg{w['gen_tokens']} | {ours:.1f} | "
                    f"{theirs:.1f} | {100 * (ours / theirs - 1):+.1f}% |")
    return rows


def llama_bench_rows(measurements: list[dict], reference: dict) -> list[str]:
    rows = ["| artifact | test | quantkit tok/s | llama-bench tok/s (mean ± sd) | difference |",
            "|---|---|---|---|---|"]
    for name, tests in reference.items():
        for test in tests:
            n_prompt, n_gen, depth = test["n_prompt"], test["n_gen"], test.get("n_depth", 0)
            prompt = n_prompt if n_prompt else depth  # our decode follows a prompt of the same length
            ours = [m for m in measurements
                    if m["artifact"]["name"] == name and m["workload"]["prompt_tokens"] == prompt]
            if not ours:
                continue
            metric = "prefill_tok_s" if n_prompt else "decode_tok_s"
            value = ours[0]["metrics"][metric]["median"]
            label = f"pp{n_prompt}" if n_prompt else f"tg{n_gen} @ depth {depth}"
            rows.append(f"| {name} | {label} | {value:.1f} | {test['avg_ts']:.1f} ± {test['stddev_ts']:.1f} | "
                        f"{100 * (value / test['avg_ts'] - 1):+.1f}% |")
    return rows


def write_report(args, threads, ship_table, first, same, slow, reference) -> None:
    from quantkit.bench import table

    environment = first[0]
    measurements = [r for r in first if r.get("type") == "measurement"]
    lines = [
        "# quantkit bench on SmolLM2-135M",
        "",
        f"`python benchmarks/bench_smollm2.py {Path(args.model).name} --eval {Path(args.eval).name}"
        f"{' --llama-bench llama-bench' if args.llama_bench else ''}` on {environment['cpu']} "
        f"({environment['usable_cores']} usable cores, {environment['memory_gb']} GiB), threads {threads}, "
        f"runtimes {json.dumps(environment['runtimes'])}.",
        "",
        "## ship (accuracy from each artifact's runtime)",
        "",
        "```", ship_table.strip(), "```",
        "",
        "## bench (5 repetitions after 1 warm-up; median ± half the 95 % interval)",
        "",
        table(first),
        "",
        "## Decode speed against llama.cpp's own counters (`llama_perf_context`, same runs)",
        "",
        *counter_agreement(measurements),
        "",
    ]
    if reference:
        lines += ["## Against llama-bench (same files, same threads, 5 repetitions, `--repack 0`, flash attention "
                  "at its default, as in quantkit's runner)", "",
                  *llama_bench_rows(measurements, reference), ""]
    lines += [
        "## bench compare",
        "",
        f"Same settings, second run (`bench_smollm2_repeat.jsonl`): exit {same.returncode}",
        "",
        same.stdout.strip(),
        "",
        f"Threads {threads} -> 1 (`bench_smollm2_threads1.jsonl`): exit {slow.returncode}",
        "",
        slow.stdout.strip(),
        "",
    ]
    (args.results / "bench_smollm2.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
