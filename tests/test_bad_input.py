"""Bad input: one clear line on stderr, exit code 2, nothing new in the output folder."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.cli import main


@pytest.fixture
def out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a file of the user's")
    return out


def run_bad(capsys, out_dir, *argv) -> str:
    parent_before = sorted(p.name for p in out_dir.parent.iterdir())
    code = main(["ship", *argv, "--out", str(out_dir), "--quiet", "--eval-samples", "2", "--seq-len", "32"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep.txt"]
    assert (out_dir / "keep.txt").read_text() == "a file of the user's"
    assert sorted(p.name for p in out_dir.parent.iterdir()) == parent_before  # no temporary folder left
    return err


def test_missing_folder(capsys, out_dir, tmp_path):
    err = run_bad(capsys, out_dir, str(tmp_path / "no-such-model"))
    assert "does not exist" in err and "checkpoint folder" in err


def test_missing_config(capsys, out_dir, tiny_llama):
    (tiny_llama / "config.json").unlink()
    assert "has no config.json" in run_bad(capsys, out_dir, str(tiny_llama))


def test_invalid_config(capsys, out_dir, tiny_llama):
    (tiny_llama / "config.json").write_text("{not json")
    assert "is not valid JSON" in run_bad(capsys, out_dir, str(tiny_llama))


def test_truncated_safetensors(capsys, out_dir, tiny_llama):
    weights = tiny_llama / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    err = run_bad(capsys, out_dir, str(tiny_llama))
    assert "truncated" in err and "re-save" in err


def test_corrupt_safetensors_header(capsys, out_dir, tiny_llama):
    weights = tiny_llama / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    raw[8 : 8 + 16] = b"\xff" * 16  # garble the JSON header
    assert header_len > 16
    weights.write_bytes(bytes(raw))
    assert "corrupt safetensors header" in run_bad(capsys, out_dir, str(tiny_llama))


def test_unsupported_architecture(capsys, out_dir, tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    err = run_bad(capsys, out_dir, str(tiny_llama))
    assert "unsupported architecture (BertForMaskedLM)" in err and "LlamaForCausalLM" in err


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_or_inf_in_weights(capsys, out_dir, tiny_llama, bad_value):
    weights = tiny_llama / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 7] = bad_value
    save_file(tensors, weights)
    err = run_bad(capsys, out_dir, str(tiny_llama))
    assert name in err and "NaN/Inf" in err


def test_group_size_not_dividing_a_row(capsys, out_dir, tiny_llama):
    err = run_bad(capsys, out_dir, str(tiny_llama), "--group-size", "96", "--targets", "gguf:Q8_0,hf-gptq")
    assert "group size 96 does not divide the row length 128" in err and "the grid of hf-gptq" in err


def test_group_size_is_not_checked_for_gguf_only_runs(capsys, tmp_path, tiny_llama):
    """GGUF types fix their own blocks: --group-size (default 128) must not stop a GGUF-only run."""
    out = tmp_path / "gguf-only"
    code = main(["ship", str(tiny_llama), "--group-size", "96", "--targets", "gguf:F32,gguf:Q8_0", "--out", str(out),
                 "--no-verify", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model-F32.gguf", "model-Q8_0.gguf"]


@pytest.mark.parametrize("spec,expected", [("coreml", "unknown target 'coreml'"),
                                           ("gguf:Q3_X", "unknown GGUF type 'Q3_X'")])
def test_unknown_target_or_type(capsys, out_dir, tiny_llama, spec, expected):
    assert expected in run_bad(capsys, out_dir, str(tiny_llama), "--targets", spec)


def test_output_folder_not_writable(capsys, tiny_llama, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder's parent should be")
    code = main(["ship", str(tiny_llama), "--out", str(blocker / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot write to output folder") and "\n" not in err
    assert blocker.read_text().startswith("a file")


def test_existing_artifact_is_not_overwritten(capsys, out_dir, tiny_llama):
    (out_dir / "model-Q8_0.gguf").write_text("an earlier artifact")
    code = main(["ship", str(tiny_llama), "--targets", "gguf:Q8_0", "--out", str(out_dir), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out_dir / "model-Q8_0.gguf").read_text() == "an earlier artifact"


def test_weights_untouched_by_a_failed_run(capsys, out_dir, tiny_llama):
    before = {p.name: p.read_bytes() for p in tiny_llama.iterdir()}
    run_bad(capsys, out_dir, str(tiny_llama), "--group-size", "96", "--targets", "hf-gptq")
    assert {p.name: p.read_bytes() for p in tiny_llama.iterdir()} == before
    assert torch.is_tensor(load_file(tiny_llama / "model.safetensors")["model.norm.weight"])


def test_cuda_requested_without_a_gpu(capsys, out_dir, tiny_llama, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on any machine
    err = run_bad(capsys, out_dir, str(tiny_llama), "--method", "gptq", "--device", "cuda")
    assert "torch sees no CUDA device" in err and "--device cpu" in err


@pytest.mark.parametrize("argv,expected", [
    (["--targets", "hf-gptq", "--bits", "3"], "--bits 3 cannot be packed"),
    (["--targets", "hf-gptq", "--group-size", "0"], "no per-tensor scales"),
    (["--targets", "hf-awq", "--bits", "8"], "hf-awq stores 4-bit group-wise weights"),
    (["--targets", "hf-awq", "--act-order", "group", "--method", "gptq"], "cannot store act-order"),
    (["--targets", "hf-gptq:Q4_0"], "hf-gptq takes no option"),
])
def test_grid_a_target_cannot_store(capsys, out_dir, tiny_llama, argv, expected):
    assert expected in run_bad(capsys, out_dir, str(tiny_llama), *argv)


def test_malformed_tokenizer_json(capsys, out_dir, tiny_llama):
    """A damaged tokenizer file is named before any work (transformers would raise a bare JSONDecodeError)."""
    (tiny_llama / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    err = run_bad(capsys, out_dir, str(tiny_llama), "--targets", "gguf:Q8_0")
    assert f"{tiny_llama / 'tokenizer.json'} is not valid JSON" in err and "restore it" in err


def test_file_size_limit_while_writing(tmp_path, tiny_llama):
    """A write refused for want of room (here the process's file-size limit, as `ulimit -f` sets it; a full disk
    gives ENOSPC through the same handler): one line naming the path and the room needed, exit 2, --out as
    it was. Run in a child: the limit applies to the whole process."""
    import resource
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a file of the user's")
    limit = 256 * 1024  # above everything a run writes before its artifact (the reference's scratch file: 32 KiB)

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "quantkit.cli", "ship", str(tiny_llama), "--targets", "gguf:Q8_0",
                           "--out", str(out), "--quiet", "--eval-samples", "2", "--seq-len", "32"],
                          preexec_fn=limited, capture_output=True, text=True, cwd=tmp_path)
    err = done.stderr.strip()
    assert done.returncode == 2, err
    assert err.startswith("error: writing ") and "\n" not in err, err
    assert "file-size limit" in err and "MiB" in err and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny-llama"]  # no temporary folder left


def test_full_disk_message_names_the_path_and_the_room_needed(tmp_path):
    import errno

    from quantkit.errors import disk_full_error

    out, staging = tmp_path / "out", tmp_path / ".out.quantkit-x"
    exc = OSError(errno.ENOSPC, "No space left on device", str(staging / "model-Q8_0.gguf"))
    message = str(disk_full_error(exc, out, staging, 3 * 2**20))
    assert message.startswith(f"no space left writing {out / 'model-Q8_0.gguf'} (")
    assert "MiB free there; it needs about 3.0 MiB" in message and "--out" in message
