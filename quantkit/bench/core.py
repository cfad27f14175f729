"""``quantkit bench``: how fast each artifact loads and answers, and how much memory it takes, in its runtime.

For every artifact (named directly, or every artifact of a ``quantkit ship`` output folder / manifest, which
also gives its accuracy) one child process (``quantkit.bench.child``) loads it and runs each workload:
``warmup`` unmeasured sequences, then ``repetitions`` measured ones, each a prompt of random token ids
(prefill) followed by greedy decode steps. Results are medians with a 95 % interval over repetitions,
latency percentiles over every decode step, and the raw samples, written as JSON Lines (schema
``SCHEMA``): one ``environment`` line, one ``measurement`` line per artifact and workload, and an ``error``
line for an artifact that failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from quantkit import __version__
from quantkit.bench import stats
from quantkit.bench.devices import LocalDevice
from quantkit.bench.runners import RUNNERS, RunnerError, cpu_count, model_file, runtime_for
from quantkit.errors import QuantkitError

SCHEMA = "quantkit.bench/1"


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int
    gen_tokens: int

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "gen_tokens": self.gen_tokens}


@dataclass(frozen=True)
class BenchOptions:
    prompt_tokens: tuple[int, ...] = (128, 512)
    gen_tokens: int = 128
    threads: int = field(default_factory=cpu_count)
    repetitions: int = 5
    warmup: int = 1
    runtime: str | None = None  # None: chosen from each artifact
    pin: bool = False  # pin the child to the first ``threads`` CPUs it may use

    def __post_init__(self) -> None:
        if not self.prompt_tokens or any(p < 1 for p in self.prompt_tokens):
            raise QuantkitError("--prompt-tokens needs positive sizes, e.g. --prompt-tokens 128,512")
        if self.gen_tokens < 0:
            raise QuantkitError("--gen-tokens must be 0 or more")
        if self.threads < 1:
            raise QuantkitError(f"--threads must be at least 1 (this machine lets quantkit use {cpu_count()})")
        if self.repetitions < 2:
            raise QuantkitError("--repetitions must be at least 2: medians and intervals need several samples")
        if self.warmup < 0:
            raise QuantkitError("--warmup must be 0 or more")
        if self.runtime is not None and self.runtime not in RUNNERS:
            raise QuantkitError(f"unknown runtime {self.runtime!r}; available: {', '.join(sorted(RUNNERS))}")

    @property
    def workloads(self) -> list[Workload]:
        return [Workload(p, self.gen_tokens) for p in self.prompt_tokens]


@dataclass
class Artifact:
    """One thing to benchmark, with what the manifest says about it when it came from one."""

    path: Path
    runtime: str
    target: str | None = None
    bits_per_weight: float | None = None
    accuracy: dict | None = None
    sha256: str | None = None

    @property
    def size_bytes(self) -> int:
        if self.path.is_dir():
            return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return self.path.stat().st_size

    def describe(self) -> dict:
        return {"path": str(self.path), "name": self.path.name, "target": self.target, "runtime": self.runtime,
                "sha256": self.sha256 or file_sha256(self.path), "size_bytes": self.size_bytes,
                "bits_per_weight": self.bits_per_weight, "accuracy": self.accuracy}


def file_sha256(path: Path) -> str:
    """The model's hash: an artifact folder's model file, or a Hugging Face folder's weight files in name
    order (config and tokenizer files are left out)."""
    digest = hashlib.sha256()
    model = model_file(path)
    for file in sorted(model.glob("*.safetensors")) if model.is_dir() else [model]:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def resolve(inputs: list[str], runtime: str | None = None) -> list[Artifact]:
    """Artifacts named by ``inputs``: files, artifact folders, manifest.json files or ship output folders."""
    found: list[Artifact] = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise QuantkitError(f"{given} does not exist; pass an artifact (.gguf, ONNX/ORT folder), a "
                                "manifest.json or a quantkit ship output folder")
        manifest = path if path.name == "manifest.json" else path / "manifest.json"
        if manifest.is_file():
            found.extend(_from_manifest(manifest, runtime))
            continue
        try:
            found.append(Artifact(path, runtime or runtime_for(path)))
        except RunnerError as exc:
            raise QuantkitError(str(exc)) from None
    if not found:
        raise QuantkitError("nothing to benchmark: the manifest lists no artifacts")
    return found


def _from_manifest(manifest: Path, runtime: str | None) -> list[Artifact]:
    try:
        data = json.loads(manifest.read_text())
        entries = data["artifacts"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise QuantkitError(f"{manifest} is not a quantkit manifest (no 'artifacts' list)") from None
    found = []
    for entry in entries:
        path = manifest.parent / entry["path"]
        try:
            chosen = runtime or runtime_for(path)
        except RunnerError as exc:
            print(f"quantkit bench: skipping {entry['target']}: {exc}", file=sys.stderr)
            continue
        found.append(Artifact(path, chosen, entry.get("target"), entry.get("bits_per_weight"),
                              entry.get("metrics"), entry.get("sha256") if path.is_file() else None))
    return found


def environment(artifacts: list[Artifact], options: BenchOptions, device) -> dict:
    """The environment line: the measuring machine (probed where the child runs), settings and artifacts."""
    return {
        "schema": SCHEMA, "type": "environment", "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "quantkit": __version__, "device": device.name, **device.probe(),
        "threads": options.threads, "pinned": options.pin,
        "artifacts": {str(a.path): a.sha256 or file_sha256(a.path) for a in artifacts},
    }


class BenchError(QuantkitError):
    """An artifact could not be benchmarked; ``exit_code`` 2 for bad input, 3 for a runtime that crashed."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def measurement(artifact: dict, options: BenchOptions, load: dict, result: dict, device: str) -> dict:
    """One JSONL measurement line from the child's ``load`` and ``workload`` events."""
    samples = result["samples"]
    steps = [ms for run in samples["decode_ms"] for ms in run]
    metrics = {
        "load_s": load["load_s"],
        "ttft_ms": stats.summarize(samples["ttft_ms"]).to_dict(),
        "prefill_tok_s": stats.summarize(samples["prefill_tok_s"]).to_dict(),
        "peak_rss_mb_load": load["load_peak_rss_mb"],
        "rss_mb_load": load["load_rss_mb"],
        "rss_mb_steady": result["rss_mb"],
        "peak_rss_mb": result["peak_rss_mb"],
        "baseline_rss_mb": load["baseline_rss_mb"],
    }
    if steps:
        metrics["decode_tok_s"] = stats.summarize(samples["decode_tok_s"]).to_dict()
        metrics.update({f"decode_ms_p{q}": stats.percentile(steps, q) for q in (50, 90, 99)})
    counters = samples.get("counters") or []
    if counters and steps:
        metrics["runtime_decode_tok_s"] = stats.summarize(
            [c["decode_tokens"] / (c["decode_ms"] / 1e3) for c in counters]).to_dict()
    return {"schema": SCHEMA, "type": "measurement", "device": device, "accelerator": load.get("accelerator", "cpu"),
            "artifact": artifact,
            "workload": result["workload"], "threads": options.threads, "repetitions": options.repetitions,
            "warmup": options.warmup, "affinity": load["affinity"], "runner": load.get("runner"), "metrics": metrics,
            "samples": samples}


def bench_artifact(artifact: Artifact, options: BenchOptions, device=None) -> Iterator[dict]:
    """Measurement lines for one artifact, yielded as the child reports them; raises ``BenchError`` when the
    runtime refuses the artifact (exit 2) or dies (exit 3), after the lines measured so far."""
    device = device or LocalDevice()
    described = artifact.describe()
    pin = sorted(os.sched_getaffinity(0))[: options.threads] if options.pin else None
    spec = {"path": device.stage(artifact.path), "runtime": artifact.runtime, "threads": options.threads,
            "repetitions": options.repetitions, "warmup": options.warmup, "pin": pin,
            "workloads": [w.to_dict() for w in options.workloads]}
    process, events, stderr_tail = device.run(spec)
    load = None
    for event in events:
        if event["event"] == "error":
            raise BenchError(f"{artifact.path}: {event['message']}", 2)
        if event["event"] == "load":
            load = event
        elif event["event"] == "workload":
            yield measurement(described, options, load, event, device.name)
    if process.returncode:
        raise BenchError(f"{artifact.runtime} crashed while benchmarking {artifact.path} ({stderr_tail()}); the "
                         "measurements taken before are kept", 3)


def bench(inputs: list[str], options: BenchOptions | None = None, jsonl: Path | None = None,
          on_measurement: Callable[[dict], None] | None = None, device=None) -> list[dict]:
    """Benchmark every artifact ``inputs`` name on ``device`` (default: this machine); returns the JSONL
    records (environment first). With ``jsonl`` each record is appended to that file as soon as it is
    measured."""
    options = options or BenchOptions()
    artifacts = resolve(inputs, options.runtime)
    for artifact in artifacts:  # hashed once: the environment line and each measurement line carry it
        artifact.sha256 = artifact.sha256 or file_sha256(artifact.path)
    device = device or LocalDevice()
    sink = None
    try:
        records = [environment(artifacts, options, device)]
        sink = open(jsonl, "w") if jsonl else None  # noqa: SIM115 - kept open across the generator's lifetime
        _write(sink, records[0])
        for artifact in artifacts:
            try:
                for record in bench_artifact(artifact, options, device):
                    records.append(record)
                    _write(sink, record)
                    if on_measurement:
                        on_measurement(record)
            except BenchError as exc:
                _write(sink, {"schema": SCHEMA, "type": "error", "artifact": str(artifact.path),
                              "message": str(exc), "exit_code": exc.exit_code})
                raise
    finally:
        if sink:
            sink.close()
        device.close()
    return records


def _write(sink, record: dict) -> None:
    if sink:
        sink.write(json.dumps(record) + "\n")
        sink.flush()
