"""Recipe files, the build cache and resume: what a build system drives.

A cache hit is checked by what the run did (its events: no quantization stage, no evaluation), not by
its time; resume by killing a real process with SIGKILL mid-pass and comparing the final bytes with an
uninterrupted run's."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import quantkit
from quantkit.builder import RecipeError, load_recipe
from quantkit.cli import main
from quantkit.manifest import artifact_digest

EXAMPLE = Path(__file__).parent.parent / "examples" / "recipe.toml"


def write_recipe(folder: Path, body: str) -> Path:
    path = folder / "recipe.toml"
    path.write_text(body)
    return path


def small_recipe(folder: Path, quant: str = "", cache: str | None = None) -> Path:
    """The embedded model x (rtn, gptq) -> two GGUF files each, checked in llama.cpp on a few rows."""
    cache_line = f'cache = "{cache}"' if cache else "cache = false"
    return write_recipe(folder, f"""
[build]
out = "dist"
targets = ["gguf:Q8_0", "gguf:Q4_K_M"]
{cache_line}

[models]
embedded = "embedded"

[quant.rtn]
method = "rtn"
eval_samples = 4
seq_len = 128

[quant.gptq]
method = "gptq"
calib_samples = 4
eval_samples = 4
seq_len = 128
{quant}
""")


def gptq_only(path: Path) -> Path:
    """The small recipe without its rtn cell (one layer-by-layer cell is what a worker must reproduce)."""
    text = path.read_text()
    path.write_text(text[: text.index("[quant.rtn]")] + text[text.index("[quant.gptq]"):])
    return path


def rtn_only(path: Path) -> Path:
    text = path.read_text()
    path.write_text(text[: text.index("[quant.gptq]")])
    return path


def artifact_hashes(result) -> dict[str, dict[str, str]]:
    return {c.name: {a["path"]: a["sha256"] for a in c.manifest["artifacts"]} for c in result.cells}


# ---- recipe checks -------------------------------------------------------------------------------

CELL = '[models]\nm = "embedded"\n[quant.a]\n'
TARGETS = 'targets = ["gguf:Q8_0"]\n'


@pytest.mark.parametrize("body,message", [
    (CELL + "bitz = 4\n" + TARGETS, r"\[quant.a\] key 'bitz' is unknown; did you mean 'bits'"),
    (CELL + 'bits = "four"\n' + TARGETS, r"\[quant.a\] bits must be int, not 'four'"),
    (CELL + "bits = 12\n" + TARGETS, r"\[quant.a\] is invalid: --bits 12 is out of range"),
    (CELL + 'targets = ["gguff:Q8_0"]', r"\[quant.a\] targets holds a bad target: unknown target 'gguff'"),
    (CELL + 'method = "rtn"', r"\[quant.a\] has no targets"),
    ('[biuld]\nout = "x"', r"the top level key 'biuld' is unknown; did you mean 'build'"),
    ("[build]\ncache = 3\n" + CELL + TARGETS, r"\[build\] cache has the wrong type"),
    ('[build]\ntargets = ["gguf:Q8_0"]\n[models]\n[quant.a]', r"\[models\] is missing or empty"),
    ("[models\n", r"is not valid TOML"),
])
def test_a_bad_recipe_is_one_line_naming_file_table_and_key(tmp_path, body, message):
    path = write_recipe(tmp_path, body)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_an_impossible_cell_is_refused_by_plan_and_build_before_any_work(tmp_path, capsys):
    """gptq with --imatrix is impossible: both commands exit 2 naming the cell, and nothing is written."""
    path = write_recipe(tmp_path, '[build]\nout = "dist"\ncache = false\n[models]\nm = "embedded"\n'
                        '[quant.ok]\ntargets = ["gguf:Q8_0"]\n'
                        '[quant.bad]\nmethod = "gptq"\ntargets = ["onnx"]\ngroup_size = 48\n')
    for command in ("plan", "build"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert "cell m/bad" in err and "--group-size 48" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "dist").exists()


def test_example_recipe_parses_into_its_matrix(tmp_path):
    """examples/recipe.toml: 2 models x 2 settings, 4 targets each; with its SmolLM2 folder replaced by a
    tiny checkpoint every cell passes plan's checks."""
    recipe = load_recipe(EXAMPLE)
    assert [c.name for c in recipe.cells] == ["embedded/rtn", "embedded/gptq", "smollm2/rtn", "smollm2/gptq"]
    assert all(c.targets == ("gguf:Q4_K_M", "onnx", "executorch", "hf-gptq") for c in recipe.cells)
    assert recipe.cells[1].recipe.method == "gptq" and recipe.cells[1].recipe.calib_samples == 64


def test_example_recipe_plans_every_cell(tiny_models, tmp_path):
    text = EXAMPLE.read_text().replace('smollm2 = "smollm2"', f'smollm2 = "{tiny_models["llama"]}"')
    text = text.replace("cache = true", f'cache = "{tmp_path / "cache"}"')
    planned = quantkit.plan(write_recipe(tmp_path, text))
    assert [p.cached for p in planned] == [False] * 4 and len({p.key for p in planned}) == 4


# ---- cache ---------------------------------------------------------------------------------------

def test_an_unchanged_rebuild_is_a_cache_hit_with_the_same_bytes(tmp_path):
    """First build: both cells quantized and checked. plan then says cached; the second build copies them
    back (events: a cache hit, no stage of work) with identical bytes; a changed setting misses."""
    cache = tmp_path / "cache"
    path = small_recipe(tmp_path, cache=str(cache))
    first = quantkit.build(path)
    assert first.ok and first.exit_code == 0 and not any(c.cache_hit for c in first.cells)
    assert all(p.cached for p in quantkit.plan(path))

    events = io.StringIO()
    second = quantkit.build(path, events=events)
    lines = [json.loads(line) for line in events.getvalue().splitlines()]
    assert all(c.cache_hit for c in second.cells)
    assert [e["hit"] for e in lines if e["event"] == "cache"] == [True, True]
    assert not [e for e in lines if e["event"] in ("stage", "block", "artifact")]
    assert artifact_hashes(first) == artifact_hashes(second)
    for cell in second.cells:  # the files in the output folders are the manifest's
        manifest = json.loads((cell.out / "manifest.json").read_text())
        assert manifest["cache"] == {"key": cell.key, "hit": True}
        for a in manifest["artifacts"]:
            assert artifact_digest(cell.out / a["path"])[1] == a["sha256"]

    changed = small_recipe(tmp_path, quant="damp_percent = 0.02", cache=str(cache))
    third = quantkit.build(changed)
    assert [c.cache_hit for c in third.cells] == [True, False]


def test_a_damaged_cache_entry_is_detected_and_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    path = rtn_only(small_recipe(tmp_path, cache=str(cache)))
    first = quantkit.build(path)
    entry = cache / "cells" / first.cells[0].key / "model-Q8_0.gguf"
    data = bytearray(entry.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensor data
    entry.write_bytes(bytes(data))
    events = io.StringIO()
    second = quantkit.build(path, events=events)
    cache_events = [json.loads(line) for line in events.getvalue().splitlines() if '"cache"' in line]
    assert cache_events[0]["hit"] is False and "model-Q8_0.gguf does not match" in cache_events[0]["damaged"]
    assert [c.cache_hit for c in second.cells] == [False]
    assert artifact_hashes(first) == artifact_hashes(second)
    assert quantkit.build(path).cells[0].cache_hit  # the rebuilt entry serves the next build


def test_build_api_reports_typed_results_and_gate_failures_exit_1(tmp_path, capsys):
    """A build script's view: BuildResult with one CellResult per cell; a cell whose gate fails makes the
    build not ok (exit code 1 from the CLI too, whose rerun is a cache hit: a cached rejection still fails)
    while the other cell's artifacts are accepted."""
    path = small_recipe(tmp_path, quant="max_kld = 1e-9", cache=str(tmp_path / "cache"))
    result = quantkit.build(path)
    assert isinstance(result, quantkit.BuildResult) and all(isinstance(c, quantkit.CellResult) for c in result.cells)
    rtn, gptq = result.cells
    assert rtn.ok and rtn.verdicts == {"gguf:Q8_0": "accepted", "gguf:Q4_K_M": "accepted"}
    assert not gptq.ok and "rejected" in gptq.verdicts.values() and result.exit_code == 1
    assert (gptq.out / "rejected").is_dir() and rtn.out == tmp_path / "dist" / "embedded" / "rtn"
    assert main(["build", str(path), "--quiet", "--json"]) == 1
    cells = json.loads(capsys.readouterr().out)
    assert [c["ok"] for c in cells] == [True, False] and all(c["cache_hit"] for c in cells)


# ---- resume --------------------------------------------------------------------------------------

def slow_model(folder: Path) -> Path:
    """8 blocks, wide enough that a GPTQ block takes a noticeable time on 2 cores."""
    from transformers import LlamaConfig

    from quantkit_testing.models import TINY, save_tiny

    return save_tiny(folder, LlamaConfig(**{**TINY, "num_hidden_layers": 8, "hidden_size": 256,
                                            "intermediate_size": 1024, "max_position_embeddings": 512}))


def ship_command(model: Path, out: Path, cache: Path, events: Path) -> list[str]:
    return [sys.executable, "-m", "quantkit.cli", "ship", str(model), "--method", "gptq", "--targets",
            "gguf:Q4_K_M,hf-gptq", "--calib-samples", "8", "--seq-len", "128", "--no-verify", "--out", str(out),
            "--cache", str(cache), "--events", str(events), "--quiet"]


def test_a_killed_gptq_pass_resumes_after_its_last_block_with_the_same_bytes(tmp_path):
    model = slow_model(tmp_path / "model")
    cache, out, events = tmp_path / "cache", tmp_path / "out", tmp_path / "events.jsonl"
    run = subprocess.Popen(ship_command(model, out, cache, events), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:  # kill -9 once block 2 of the first pass is saved
        if events.is_file() and any(json.loads(line).get("block") == 2 for line in events.read_text().splitlines()
                                    if line.endswith("}")):
            os.kill(run.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert run.wait(60) == -signal.SIGKILL, "the run ended before it could be killed mid-pass"
    assert not (out / "model-Q4_K_M.gguf").exists() and not (out / "hf-gptq").exists()  # nothing half-visible

    subprocess.run(ship_command(model, out, cache, events), check=True, capture_output=True)
    resumed = [json.loads(line) for line in events.read_text().splitlines()]
    resume = [e for e in resumed if e["event"] == "resume"]
    assert resume and resume[0]["after_block"] >= 2
    first_pass_blocks = [e["block"] for e in resumed if e["event"] == "block" and e["grid"] == resume[0]["grid"]]
    assert first_pass_blocks[0] == resume[0]["after_block"] + 1  # the done blocks were not redone
    assert not any((cache / "resume").iterdir())  # a finished run leaves nothing to resume

    fresh = tmp_path / "fresh"
    subprocess.run(ship_command(model, fresh, tmp_path / "other-cache", tmp_path / "e2.jsonl"), check=True,
                   capture_output=True)
    for name in ("model-Q4_K_M.gguf", "hf-gptq/model.safetensors"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name


# ---- ray -----------------------------------------------------------------------------------------

def test_ray_executor_gives_the_local_executors_results(tmp_path):
    """The same recipe on a local Ray instance (2 CPUs, one task per cell) and on the local executor, each
    with its own cache so both really compute: the same verdicts and the same artifact bytes."""
    import ray  # the ray extra; CI installs it, so a missing Ray fails here rather than skipping
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    local_dir.mkdir()
    ray_dir.mkdir()
    local = quantkit.build(gptq_only(small_recipe(local_dir, cache=str(local_dir / "cache"))))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = quantkit.build(gptq_only(small_recipe(ray_dir, cache=str(ray_dir / "cache"))), executor="ray")
    finally:
        ray.shutdown()
    assert [c.name for c in remote.cells] == [c.name for c in local.cells] == ["embedded/gptq"]
    assert [c.verdicts for c in remote.cells] == [c.verdicts for c in local.cells]
    assert artifact_hashes(remote) == artifact_hashes(local)
    assert all((c.out / "manifest.json").is_file() and c.out.is_relative_to(ray_dir) for c in remote.cells)
