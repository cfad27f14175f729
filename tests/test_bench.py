"""quantkit bench: statistics against scipy and hand-computed values, the measuring child against the
runtimes' own counters, JSON Lines content, compare's decisions, and bad input."""

import getpass
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantkit.bench import BenchError, BenchOptions, bench, compare, read_jsonl, stats
from quantkit.bench.core import Artifact, bench_artifact
from quantkit.bench.devices import AdbDevice, SshDevice
from quantkit.bench.html import pareto_front, write_html
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit_testing.helpers import runner_and_transformers_greedy
from quantkit_testing.runtimes import require, require_program

require("llama_cpp")
require("onnxruntime")
scipy_stats = require("scipy.stats")

SMALL = ["--prompt-tokens", "16,32", "--gen-tokens", "8", "--repetitions", "3", "--warmup", "0", "--threads", "1"]
METRICS = {"load_s", "ttft_ms", "prefill_tok_s", "decode_tok_s", "decode_ms_p50", "decode_ms_p90", "decode_ms_p99",
           "peak_rss_mb_load", "rss_mb_load", "rss_mb_steady", "peak_rss_mb", "baseline_rss_mb"}


# ---- statistics -------------------------------------------------------------------------------
@pytest.mark.parametrize("x,y", [
    ([1.0, 2, 3, 4, 5], [6.0, 7, 8, 9, 10]),          # complete separation: p = 1 / C(10, 5) = 1/252
    ([3.1, 1.2, 5.5, 2.0], [2.5, 4.4, 6.1, 0.3, 7.7]),  # interleaved, no ties: exact
    ([1.0, 2, 2, 3, 5, 5, 5], [2.0, 4, 5, 6, 6, 7]),     # ties: normal approximation with tie correction
])
def test_mann_whitney_matches_scipy(x, y):
    method = "exact" if len(set(x) | set(y)) == len(x) + len(y) else "asymptotic"
    expected = scipy_stats.mannwhitneyu(x, y, alternative="less", method=method).pvalue
    assert stats.mann_whitney_less(x, y) == pytest.approx(expected, rel=1e-9)
    if method == "exact":
        assert stats.mann_whitney_less([1.0, 2, 3, 4, 5], [6.0, 7, 8, 9, 10]) == pytest.approx(1 / 252)


def test_median_interval_is_the_binomial_order_statistics():
    # n = 20: ranks 6 and 15 (the textbook table; coverage 1 - 2 P(Binomial(20, 1/2) <= 5) = 0.9586)
    assert stats.median_ci([float(v) for v in range(1, 21)]) == (6.0, 15.0)
    # under 6 samples no pair reaches 95 %: the range
    assert stats.median_ci([5.0, 1.0, 3.0, 2.0, 4.0]) == (1.0, 5.0)


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    values = [0.3, 9.1, 4.4, 2.2, 7.7, 1.5, 3.3]
    for q in (50, 90, 99):
        assert stats.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


# ---- a real run -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The embedded model shipped to a GGUF file and an ONNX folder (export only: bench reads the manifest)."""
    out = tmp_path_factory.mktemp("bench") / "out"
    assert main(["ship", "--targets", "gguf:Q8_0,onnx,hf-gptq", "--out", str(out), "--no-verify", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def records(shipped):
    jsonl = shipped.parent / "run.jsonl"
    assert main(["bench", str(shipped), "--json", str(jsonl), *SMALL]) == 0
    return read_jsonl(jsonl)


def test_bench_writes_environment_and_one_measurement_per_artifact_and_workload(records):
    environment, *measurements = records
    assert environment["type"] == "environment" and environment["schema"] == "quantkit.bench/1"
    assert {"cpu", "cores", "memory_gb", "os", "runtimes", "quantkit", "artifacts"} <= environment.keys()
    assert set(environment["runtimes"]) == {"llama.cpp", "onnxruntime", "onnxruntime-genai", "transformers",
                                            "quantkit", "executorch", "litert"}
    assert sorted((m["artifact"]["runtime"], m["workload"]["prompt_tokens"]) for m in measurements) == [
        ("llama.cpp", 16), ("llama.cpp", 32), ("onnxruntime", 16), ("onnxruntime", 32), ("transformers", 16),
        ("transformers", 32)]
    for m in measurements:
        assert m["metrics"].keys() >= METRICS, m["artifact"]["runtime"]
        assert len(m["samples"]["ttft_ms"]) == 3 and [len(run) for run in m["samples"]["decode_ms"]] == [8, 8, 8]
        assert m["metrics"]["decode_tok_s"]["median"] > 0 and m["threads"] == 1
        # accuracy comes from the manifest (None: shipped with --no-verify) and the hash from the file
        assert m["artifact"]["sha256"] == environment["artifacts"][m["artifact"]["path"]]


def test_llama_cpp_decode_is_exactly_the_work_its_counters_count(records):
    """Our timed steps cover the decode llama.cpp counts itself: one eval per generated token and the prompt
    in prefill (its counters are the independent reference that the speed benchmark compares with)."""
    for m in (r for r in records[1:] if r["artifact"]["runtime"] == "llama.cpp"):
        for counters in m["samples"]["counters"]:
            assert counters["decode_tokens"] == 8 and counters["prompt_tokens"] == m["workload"]["prompt_tokens"]
        assert m["metrics"]["runtime_decode_tok_s"]["median"] > 0


def test_compare_passes_a_run_against_itself_and_flags_a_slowed_one(records, shipped, tmp_path, capsys):
    same = shipped.parent / "run.jsonl"
    assert main(["bench", "compare", str(same), str(same)]) == 0
    slowed = [dict(r) for r in records]
    for r in slowed[1:]:
        r["samples"] = {**r["samples"], "decode_tok_s": [v / 2 for v in r["samples"]["decode_tok_s"]]}
    path = tmp_path / "slow.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in slowed))
    # 3 repetitions each: the smallest possible one-sided p is 1 / C(6, 3) = 0.05, so the default alpha
    # (0.01) cannot flag anything, and compare says so
    assert main(["bench", "compare", str(same), str(path)]) == 0
    assert "cannot reach p < 0.01" in capsys.readouterr().err
    assert main(["bench", "compare", str(same), str(path), "--alpha", "0.1"]) == 1
    flagged = {(f["artifact"], f["metric"]) for f in compare(records, slowed, alpha=0.1) if f["regression"]}
    assert {metric for _, metric in flagged} == {"decode_tok_s"}
    assert "regression" in capsys.readouterr().err


# ---- bad input --------------------------------------------------------------------------------
def test_a_missing_artifact_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_an_artifact_no_runtime_loads_is_refused_by_the_runtime(tmp_path, capsys):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    jsonl = tmp_path / "b.jsonl"
    assert main(["bench", str(broken), "--json", str(jsonl), *SMALL]) == 2
    assert "llama.cpp could not load" in capsys.readouterr().err
    assert read_jsonl(jsonl)[-1]["type"] == "error"


def test_unsupported_artifact_kinds_and_runtimes_are_named(tmp_path, capsys):
    pte = tmp_path / "model.pte"
    pte.write_bytes(b"\0")
    assert main(["bench", str(pte)]) == 2
    assert "the ExecuTorch runtime could not load" in capsys.readouterr().err
    with pytest.raises(QuantkitError, match="unknown runtime 'tflite'"):
        BenchOptions(runtime="tflite")


class CrashingDevice:
    """Reports one workload, then dies the way a runtime that segfaults would."""

    name = "local"

    def stage(self, path):
        return str(path)

    def run(self, spec):
        import subprocess

        script = ("import json; print(json.dumps({'event': 'load', 'load_s': 0.1, 'baseline_rss_mb': 1, "
                  "'load_rss_mb': 2, 'load_peak_rss_mb': 2, 'vocab_size': 10, 'affinity': [0]}));"
                  "print(json.dumps({'event': 'workload', 'workload': {'prompt_tokens': 4, 'gen_tokens': 0}, "
                  "'samples': {'ttft_ms': [1.0, 2.0], 'prefill_tok_s': [4.0, 2.0], 'decode_tok_s': [], "
                  "'decode_ms': [[], []], 'counters': []}, 'rss_mb': 2, 'peak_rss_mb': 2}), flush=True);"
                  "import os; os.abort()")
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)

        def lines():
            for line in process.stdout:
                yield json.loads(line)
            process.wait()

        return process, lines(), lambda: "aborted"


def test_a_runtime_crash_keeps_the_measurements_taken_and_exits_3(shipped):
    gguf = next(shipped.glob("*.gguf"))
    kept = []
    with pytest.raises(BenchError) as caught:
        for record in bench_artifact(Artifact(gguf, "llama.cpp"), BenchOptions(prompt_tokens=(4,), gen_tokens=0,
                                                                              repetitions=2), CrashingDevice()):
            kept.append(record)
    assert caught.value.exit_code == 3 and "crashed" in str(caught.value)
    assert len(kept) == 1 and kept[0]["samples"]["ttft_ms"] == [1.0, 2.0]


# ---- the HTML report, checked in a real browser ----------------------------------------------------
def test_pareto_front_is_every_artifact_no_other_beats_on_size_and_speed():
    # (size, tok/s): b is smaller and faster than a; c is the largest but the fastest; d ties b exactly
    points = [(10.0, 50.0), (8.0, 60.0), (12.0, 90.0), (8.0, 60.0), (9.0, 55.0)]
    assert pareto_front(points) == [1, 2, 3]


def test_html_report_renders_in_chromium_with_every_plot(records, tmp_path):
    chromium = require_program("chromium", "scripts/install-test-deps.sh installs it: the report is checked in a "
                                           "real browser")
    page = tmp_path / "bench.html"
    write_html(records, page)
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*browser, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    # the page marks on load how many of its images the browser decoded (0 for a broken data URI)
    assert 'data-images-loaded="3"' in dom, dom[:300]
    for label in ("Q8_0", "onnx"):
        assert label in dom
    shot = tmp_path / "bench.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1100,1800", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # plots drawn, not a blank page


# ---- devices: over SSH for real, adb as designed ------------------------------------------------
@pytest.fixture
def sshd(tmp_path):
    """An OpenSSH server on 127.0.0.1 that lets this user in with a fresh key; yields (port, key)."""
    binary = require_program("sshd", "scripts/install-test-deps.sh installs it: the SSH device is tested against it")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "client.pub").read_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp_path / 'host'}\n"
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nPidFile {tmp_path / 'sshd.pid'}\n")
    if os.geteuid() == 0:  # sshd started by root wants its privilege-separation folder
        os.makedirs("/run/sshd", exist_ok=True)
    server = subprocess.Popen([binary, "-D", "-e", "-f", str(tmp_path / "sshd_config")], stderr=subprocess.PIPE)
    for _ in range(100):
        with socket.socket() as client:
            if client.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield port, str(tmp_path / "client")
    server.terminate()
    server.wait(10)


def test_ssh_device_copies_artifact_and_runner_and_measures_there(shipped, sshd):
    port, key = sshd
    device = SshDevice(f"ssh://{getpass.getuser()}@127.0.0.1:{port}", identity=key, python=sys.executable,
                       extra_options=("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                      "-o", "LogLevel=ERROR"))
    gguf = next(shipped.glob("*.gguf"))
    seen_dirs = []
    records = bench([str(gguf)], BenchOptions(prompt_tokens=(8,), gen_tokens=4, repetitions=2, warmup=0, threads=1),
                    device=device, on_measurement=lambda r: seen_dirs.append(device.remote_dir))
    environment, measured = records
    assert environment["device"] == f"ssh:{getpass.getuser()}@127.0.0.1:{port}" and environment["cores"] >= 1
    assert measured["device"] == environment["device"] and measured["metrics"]["decode_tok_s"]["median"] > 0
    # the child ran from the copied runner zip, in the remote folder, and that folder is gone afterwards
    remote = seen_dirs[0]
    assert measured["runner"] == f"{remote}/{SshDevice.RUNNER}"
    assert device.remote_dir is None and not os.path.exists(remote)


def test_ssh_device_that_cannot_log_in_is_one_line(shipped, tmp_path, capsys):
    gguf = next(shipped.glob("*.gguf"))
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["bench", str(gguf), "--device", f"ssh://127.0.0.1:{port}", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without a password prompt" in err[0]


def test_adb_device_is_designed_with_its_commands_and_refused_until_tried(shipped, capsys):
    spec = {"path": "x", "runtime": "llama.cpp", "threads": 4, "pin": [4, 5, 6, 7], "workloads": []}
    commands = AdbDevice("R58M", python="python3").commands(spec, Path("/a/model-Q4_K_M.gguf"))
    remote = "/data/local/tmp/quantkit-bench"
    assert commands[0] == ["adb", "-s", "R58M", "shell", f"mkdir -p {remote}"]
    assert commands[2] == ["adb", "-s", "R58M", "push", "/a/model-Q4_K_M.gguf", f"{remote}/model-Q4_K_M.gguf"]
    assert commands[3][:4] == ["adb", "-s", "R58M", "shell"] and "taskset f0 python3 -m quantkit.bench.child" in \
        commands[3][4] and f'"path": "{remote}/model-Q4_K_M.gguf"' in commands[3][4]
    assert main(["bench", str(next(shipped.glob("*.gguf"))), "--device", "adb", *SMALL]) == 2
    assert "untested on hardware" in capsys.readouterr().err


def test_quantkit_runtime_decodes_the_same_tokens_as_transformers_on_an_hf_gptq_folder(shipped):
    """Two independent runtimes over one checkpoint (transformers + gptqmodel's kernels, quantkit's QuantLinear)
    must pick the same greedy tokens: a runner that mis-feeds its cache would drift within a few steps."""
    from quantkit.bench.runners import QuantkitRunner, TransformersRunner

    folder = next(p for p in shipped.iterdir() if any(p.glob("*.safetensors")))
    prompt = list(range(5, 37))
    streams = []
    for runner_class in (TransformersRunner, QuantkitRunner):
        runner = runner_class(folder, threads=1, n_ctx=64)
        token, tokens = runner.prefill(prompt), []
        for _ in range(12):
            tokens.append(token)
            token = runner.step(token)
        streams.append(tokens)
    assert streams[0] == streams[1]


def test_the_childs_memory_is_its_own_not_its_parents(shipped):
    """A child started by a large process (``ship --bench``) reports its own peak: Linux carries getrusage's
    ru_maxrss across exec, so a peak read from it would be at least the parent's resident size."""
    from quantkit.bench.child import rss_mb

    ballast = bytearray(768 * 2**20)
    ballast[:: 4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page: resident
    parent = rss_mb()
    gguf = next(shipped.glob("*.gguf"))
    options = BenchOptions(prompt_tokens=(8,), gen_tokens=2, repetitions=2, warmup=0, threads=1)
    measured = list(bench_artifact(Artifact(gguf, "llama.cpp"), options))
    assert parent > 768 and measured[0]["metrics"]["peak_rss_mb"] < parent - 512, (parent, measured[0]["metrics"])
    del ballast


def test_executorch_kv_program_decodes_transformers_greedy_tokens(tmp_path):
    """A KV-cache program (prefill, then one token per call at its position) against transformers' greedy
    decoding of the same fp32 weights: a cache slot or position error would pick other tokens."""
    from quantkit.bench.runners import ExecuTorchRunner

    out = tmp_path / "pte"
    assert main(["ship", "--targets", "executorch:fp32", "--out", str(out), "--no-verify", "--quiet"]) == 0
    runner = ExecuTorchRunner(out / "executorch-fp32", threads=1, n_ctx=40)
    assert runner.kv_cache
    generated, expected = runner_and_transformers_greedy(runner, list(range(40, 56)), 16)
    assert generated == expected


def test_executorch_full_sequence_program_decodes_by_rerunning_the_whole_sequence(tiny_models, tmp_path):
    """A family without a KV-cache program (Phi-3) gets a full-sequence .pte: each decode step re-runs the
    fixed-length program. The runner's greedy tokens must equal those read from the full-sequence logits the
    runtime returns for the final sequence (a padding or position error would pick other tokens)."""
    from quantkit.bench.runners import ExecuTorchRunner

    out = tmp_path / "pte"
    assert main(["ship", str(tiny_models["phi3"]), "--targets", "executorch:8da8w", "--seq-len", "48",
                 "--out", str(out), "--no-verify", "--quiet"]) == 0
    pte = out / "executorch-8da8w"
    runner = ExecuTorchRunner(pte, threads=1, n_ctx=33)
    assert not runner.kv_cache
    prompt = list(range(40, 56))
    token, generated = runner.prefill(prompt), []
    for _ in range(16):
        generated.append(token)
        token = runner.step(token)
    assert runner.tokens == prompt + generated  # every step fed the token before it
    import torch

    ids = torch.zeros((1, runner.length), dtype=torch.long)
    sequence = prompt + generated
    ids[0, : len(sequence)] = torch.tensor(sequence)
    logits = runner.method.execute([ids])[0][0]
    assert [int(logits[i].argmax()) for i in range(len(prompt) - 1, len(sequence) - 1)] == generated
    with pytest.raises(Exception, match="exactly 48 tokens"):
        ExecuTorchRunner(pte, threads=1, n_ctx=60)
