"""The measuring process: ``python -m quantkit.bench.child SPEC_JSON``.

One child per artifact, so one runtime's memory never counts against another's; it imports only its
runtime and numpy. It prints one JSON object per line as soon as each is measured (a crash later keeps
the lines already printed): ``load``, then one ``workload`` per prompt/generation size, then ``done``.
A runtime that cannot load the artifact prints ``{"event": "error", "kind": "input", ...}`` and exits 2.
``--probe`` prints the machine's description (``machine()``) instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from quantkit.bench.runners import RUNNERS, RunnerError, model_file


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Resident memory now (VmRSS), MiB."""
    return _status_mb("VmRSS:")


def peak_rss_mb() -> float:
    """Peak resident memory of this program so far (VmHWM), MiB. Not ru_maxrss: Linux carries that across
    exec, so a child started by a large process (``ship --bench``) would report its parent's peak."""
    return _status_mb("VmHWM:")


def machine() -> dict:
    """This machine as the environment line records it: CPU, cores, memory, OS, Python, runtime versions."""
    import platform

    from quantkit.bench.runners import cpu_count

    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "runtimes": {name: runner.versions() for name, runner in RUNNERS.items()}}


def _cpu_model() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def measure_sequence(runner, prompt: list[int], gen_tokens: int) -> dict:
    """One prompt then ``gen_tokens`` greedy decode steps; times in seconds."""
    runner.reset()
    start = time.perf_counter()
    token = runner.prefill(prompt)
    ttft = time.perf_counter() - start
    steps = []
    for _ in range(gen_tokens):
        start = time.perf_counter()
        token = runner.step(token)
        steps.append(time.perf_counter() - start)
    return {"ttft_s": ttft, "step_s": steps, "counters": runner.counters()}


def run_workload(runner, prompt_tokens: int, gen_tokens: int, repetitions: int, warmup: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, runner.vocab_size, prompt_tokens).tolist()  # random ids, as llama-bench uses
    for _ in range(warmup):
        measure_sequence(runner, prompt, gen_tokens)
    runs = [measure_sequence(runner, prompt, gen_tokens) for _ in range(repetitions)]
    return {
        "ttft_ms": [r["ttft_s"] * 1e3 for r in runs],
        "prefill_tok_s": [prompt_tokens / r["ttft_s"] for r in runs],
        "decode_tok_s": [len(r["step_s"]) / sum(r["step_s"]) for r in runs] if gen_tokens else [],
        "decode_ms": [[s * 1e3 for s in r["step_s"]] for r in runs],
        "counters": [r["counters"] for r in runs if r["counters"] is not None],
    }


def main(spec: dict) -> int:
    if spec.get("pin"):
        os.sched_setaffinity(0, set(spec["pin"]))
    path = Path(spec["path"])
    baseline = rss_mb()
    start = time.perf_counter()
    n_ctx = max(w["prompt_tokens"] + w["gen_tokens"] for w in spec["workloads"]) + 1
    try:
        runner = RUNNERS[spec["runtime"]](model_file(path), spec["threads"], n_ctx)
    except RunnerError as exc:
        emit({"event": "error", "kind": "input", "message": str(exc)})
        return 2
    # "runner": where quantkit was imported from (a remote device's copied zip, or the local install)
    emit({"event": "load", "load_s": time.perf_counter() - start, "baseline_rss_mb": baseline,
          "load_rss_mb": rss_mb(), "load_peak_rss_mb": peak_rss_mb(), "vocab_size": runner.vocab_size,
          "accelerator": runner.device, "affinity": sorted(os.sched_getaffinity(0)),
          "runner": str(Path(__file__).parents[2])})
    for workload in spec["workloads"]:
        samples = run_workload(runner, workload["prompt_tokens"], workload["gen_tokens"], spec["repetitions"],
                               spec["warmup"], spec.get("seed", 0))
        emit({"event": "workload", "workload": workload, "samples": samples, "rss_mb": rss_mb(),
              "peak_rss_mb": peak_rss_mb()})
    runner.close()
    emit({"event": "done", "peak_rss_mb": peak_rss_mb()})
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        emit(machine())
        sys.exit(0)
    sys.exit(main(json.loads(sys.argv[1])))
