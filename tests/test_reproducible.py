"""The same inputs give the same bytes: two ship processes with different hash seeds and thread counts write
byte-identical artifacts (GPTQ's layer-by-layer pass included) and manifests equal apart from times and paths.

The thread counts differ on purpose: MKL's Cholesky changes its low bits with them, and its dynamic threading
can change the count between two runs on a busy machine (a CI run once got different GGUF bytes that way)."""

import json
import os
import subprocess
import sys

TIMES = ("created", "seconds")


def ship(out, seed: str, threads: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    command = [sys.executable, "-m", "quantkit.cli", "ship", "--method", "gptq", "--targets",
               "gguf:Q4_K_M,hf-gptq,onnx", "--calib-samples", "4", "--seq-len", "128", "--no-verify",
               "--out", str(out), "--quiet"]
    subprocess.run(command, check=True, env=env, capture_output=True)
    return json.loads((out / "manifest.json").read_text())


def without_times(value):
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def test_two_processes_with_different_hash_seeds_and_threads_write_the_same_bytes(tmp_path):
    first, second = ship(tmp_path / "a", "1", "2"), ship(tmp_path / "b", "2", "1")
    hashes = [{a["path"]: a["sha256"] for a in m["artifacts"]} for m in (first, second)]
    assert hashes[0] == hashes[1] and len(hashes[0]) == 3
    for manifest in (first, second):
        manifest.pop("out", None)
    assert without_times(first) == without_times(second)
    # the manifest's hashes are the files' own
    import hashlib

    for path, digest in hashes[0].items():
        target = tmp_path / "a" / path
        if target.is_file():
            assert hashlib.sha256(target.read_bytes()).hexdigest() == digest


def test_a_second_run_on_the_same_output_folder_is_refused_while_the_first_holds_it(tmp_path):
    """Two runs on one --out at once: the second is refused by the first's lock (not interleaved), writes
    nothing, and the lock is gone once the first ends."""
    import multiprocessing

    import pytest

    import quantkit
    from quantkit.errors import QuantkitError
    from quantkit.pipeline import _output_lock

    out = tmp_path / "o"
    ready, release = multiprocessing.Event(), multiprocessing.Event()

    def hold() -> None:  # another process in the middle of its run
        with _output_lock(out):
            ready.set()
            release.wait(60)

    holder = multiprocessing.get_context("fork").Process(target=hold)
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(QuantkitError, match="another quantkit run is writing"):
            quantkit.ship(None, targets=["gguf:Q8_0"], out=out, verify=False)
        assert not out.exists()
    finally:
        release.set()
        holder.join(30)
    result = quantkit.ship(None, targets=["gguf:Q8_0"], out=out, verify=False)
    assert result.ok and not (tmp_path / ".o.lock").exists()
