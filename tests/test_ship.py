"""End to end: `quantkit ship` on the embedded model, artifacts scored from llama.cpp's logits."""

import json
from pathlib import Path

import pytest

import quantkit
from quantkit.cli import main
from quantkit.manifest import file_sha256
from quantkit.model import ModelSource


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    out = tmp_path_factory.mktemp("ship") / "dist"
    code = main(["ship", "--targets", "gguf:Q8_0,gguf:Q4_0", "--out", str(out), "--eval-samples", "8", "--quiet"])
    return code, out, json.loads((out / "manifest.json").read_text())


def test_ship_writes_accepted_artifacts(shipped):
    code, out, manifest = shipped
    assert code == 0 and manifest["accepted"] is True
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model-Q4_0.gguf", "model-Q8_0.gguf"]
    for art in manifest["artifacts"]:
        path = out / art["path"]
        assert art["bytes"] == path.stat().st_size and art["sha256"] == file_sha256(path)
        assert art["runtime"]["name"].startswith("llama.cpp") and art["runtime"]["version"]
        assert art["verdict"] == "accepted" and art["failures"] == []
        assert art["tokenizer_check"]["match"] is True


def test_eight_bit_is_within_one_percent(shipped):
    _, _, manifest = shipped
    q8 = next(a for a in manifest["artifacts"] if a["target"] == "gguf:Q8_0")
    assert abs(q8["metrics"]["ppl_increase_pct"]) < 1.0
    assert q8["metrics"]["top1"] > 0.97


def test_four_bit_is_worse_than_eight_bit(shipped):
    _, _, manifest = shipped
    m = {a["target"]: a["metrics"] for a in manifest["artifacts"]}
    assert m["gguf:Q4_0"]["kld"] > m["gguf:Q8_0"]["kld"]
    assert m["gguf:Q4_0"]["top1"] < m["gguf:Q8_0"]["top1"]


def test_manifest_describes_model_recipe_and_data(shipped):
    _, _, manifest = shipped
    src = ModelSource()
    assert manifest["quantkit_version"] == quantkit.__version__
    assert manifest["model"]["architecture"] == "llama"
    assert manifest["model"]["parameters"] == src.parameter_count
    assert manifest["model"]["weights_sha256"] == src.weight_sha256()
    assert manifest["recipe"]["method"] == "rtn"
    assert manifest["data"]["eval"]["tokens"] == 8 * 512
    assert manifest["reference"]["metrics"]["perplexity"] > 1
    assert manifest["environment"]["packages"]["llama-cpp-python"]


def test_json_output_and_gate_rejection(tmp_path, capsys):
    out = tmp_path / "strict"
    code = main(["ship", "--targets", "gguf:Q4_0", "--out", str(out), "--eval-samples", "2", "--seq-len", "128",
                 "--max-kld", "0", "--json", "--quiet"])
    captured = capsys.readouterr()
    manifest = json.loads(captured.out)  # stdout holds only the manifest
    assert code == 1
    assert manifest["accepted"] is False
    art = manifest["artifacts"][0]
    assert art["verdict"] == "rejected" and art["failures"][0].startswith("KLD")
    assert art["path"] == "rejected/model-Q4_0.gguf" and (out / art["path"]).is_file()
    assert not (out / "model-Q4_0.gguf").exists()
    assert "REJECTED: KLD" in captured.err and "model-Q4_0.gguf failed its accuracy gate: KLD" in captured.err
    assert "mean KL divergence of the next-token distribution" in captured.err  # what the number means
    assert "try: --method gptq" in captured.err and "--imatrix calib" in captured.err  # what to try
    assert art["remedies"] and "gguf:Q4_K_M" in art["remedies"][-1]


def test_default_targets_are_what_users_ship():
    from quantkit.cli import build_parser

    args = build_parser().parse_args(["ship"])
    assert args.targets == ["gguf:Q4_K_M", "gguf:Q8_0"] and args.verify is True


def test_no_verify_exports_without_checking(tmp_path, capsys, monkeypatch):
    from quantkit import reference
    from quantkit.targets.gguf import GGUFTarget

    def never(*_a, **_k):
        raise AssertionError("--no-verify must not compute a reference")

    opened = []
    runtime_logits = GGUFTarget.logits

    def load_check_only(self, path, ids, progress=True):
        opened.append(tuple(ids.shape))
        return runtime_logits(self, path, ids, progress)

    monkeypatch.setattr(reference.Reference, "__init__", never)
    monkeypatch.setattr(GGUFTarget, "logits", load_check_only)
    out = tmp_path / "unchecked"
    assert main(["ship", "--targets", "gguf:Q4_K_M", "--out", str(out), "--no-verify", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    manifest = json.loads(captured.out)
    assert manifest["verified"] is False and manifest["reference"] is None and manifest["data"]["eval"] is None
    art = manifest["artifacts"][0]
    assert art["verdict"] == "unverified" and art["metrics"] is None and art["gate"] is None
    assert (out / "model-Q4_K_M.gguf").stat().st_size == art["bytes"]
    assert "not checked (--no-verify)" in captured.err
    assert opened == [(1, 512)]  # opened once in llama.cpp, one row of --seq-len tokens: a load check, no score


def test_no_verify_never_ships_a_file_its_runtime_cannot_load(tiny_models, tmp_path, capsys, monkeypatch):
    """A Phi-3 folder named "...phi3..." with a vocabulary lacking Phi-3's tokens: llama.cpp cannot load a file whose
    general.name says phi3 (quantkit renames it). With the rename undone, --no-verify's load check rejects it."""
    import shutil

    from quantkit.targets import gguf as gguf_target

    folder = tmp_path / "tiny-phi3-model"
    shutil.copytree(tiny_models["phi3"], folder)
    out = tmp_path / "ok"
    assert main(["ship", str(folder), "--targets", "gguf:F32", "--out", str(out), "--no-verify", "--quiet"]) == 0
    from quantkit_testing.helpers import gguf_field

    assert gguf_field(out / "model-F32.gguf", "general.name") == "tiny-phi 3-model"

    monkeypatch.setattr(gguf_target, "gguf_model_name", lambda name, vocab: name)
    out = tmp_path / "broken"
    assert main(["ship", str(folder), "--targets", "gguf:F32", "--out", str(out), "--no-verify", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "model-F32.gguf does not run in its runtime: llama.cpp" in err and "cannot run model-F32.gguf" in err
    assert (out / "rejected" / "model-F32.gguf").is_file() and not (out / "model-F32.gguf").exists()


def test_internal_failure_is_one_line_and_a_log(tmp_path, capsys, monkeypatch):
    from quantkit.targets.gguf import GGUFTarget

    def broken(*_a, **_k):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(GGUFTarget, "export", broken)
    out = tmp_path / "never"
    code = main(["ship", "--targets", "gguf:Q8_0", "--out", str(out), "--no-verify", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "\n" not in err and err.startswith("error: internal failure (RuntimeError: something")
    log = Path(err.split("details in ")[1].split(";")[0]).read_text()
    assert "Traceback" in log and "something inside broke" in log
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []  # nothing half-written


def test_python_api(tmp_path):
    result = quantkit.ship(targets=["gguf:Q5_1"], out=tmp_path / "api", eval_samples=2, seq_len=128)
    assert isinstance(result, quantkit.ShipResult) and result.ok
    assert result.artifacts[0].target == "gguf:Q5_1"
    assert result.manifest["artifacts"][0]["sha256"] == result.artifacts[0].sha256
    with pytest.raises(TypeError, match="unknown recipe options"):
        quantkit.ship(out=tmp_path / "x", bitz=4)


def test_overwrite_replaces_only_our_files(tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    for _ in range(2):
        assert main(["ship", "--targets", "gguf:F16", "--out", str(out), "--eval-samples", "1", "--seq-len", "64",
                     "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model-F16.gguf", "notes.md"]


def test_tokenizer_mismatch_is_reported_apart_from_accuracy(tiny_llama, tmp_path, capsys, monkeypatch):
    """llama.cpp splitting text differently from tokenizer.json rejects the artifact as a tokenizer problem
    (with the first difference shown), not as an accuracy failure; the override ships it and is recorded."""
    from quantkit.targets import gguf_vocab

    spec = json.loads((tiny_llama / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_vocab.LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (tiny_llama / "tokenizer.json").write_text(json.dumps(spec))
    # a pre-tokenizer llama.cpp does not reproduce: its qwen2 rule splits digits one by one, Llama-3's in threes
    monkeypatch.setitem(gguf_vocab.SPLIT_REGEX_PRE, gguf_vocab.LLAMA3_REGEX, "qwen2")
    text = tmp_path / "eval.txt"
    text.write_text("In 2024 the 12345 results were counted twice.\n" * 40)
    args = ["ship", str(tiny_llama), "--targets", "gguf:F32", "--eval", str(text), "--eval-samples", "2",
            "--seq-len", "64", "--quiet", "--json"]

    assert main([*args, "--out", str(tmp_path / "strict")]) == 1
    captured = capsys.readouterr()
    art = json.loads(captured.out)["artifacts"][0]
    assert art["verdict"] == "rejected" and len(art["failures"]) == 1 and art["failures"][0].startswith("tokenizer:")
    assert art["metrics"]["kld"] < 1e-6  # the weights are fine: not an accuracy failure
    first = art["tokenizer_check"]["first_mismatch"]
    assert first["hf"] != first["runtime"] and "2024" in "".join(first["hf"]) and "2024" in first["text"]
    assert "llama.cpp tokenizes 1 of 1 texts differently from tokenizer.json" in captured.err
    assert "failed its accuracy gate" not in captured.err and "--allow-tokenizer-mismatch" in captured.err

    assert main([*args, "--out", str(tmp_path / "allowed"), "--allow-tokenizer-mismatch"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    art = manifest["artifacts"][0]
    assert art["verdict"] == "accepted" and art["tokenizer_check"]["allowed"] is True
    assert manifest["recipe"]["allow_tokenizer_mismatch"] is True


def test_every_target_ships_with_its_default_options(default_ship):
    """Each registered target with no option and every recipe default (--seq-len 512 included, as long as the
    embedded model's context), checked in its runtime; only the evaluation is cut to one row. A default that
    fails (onnx-genai once asked its generator for one position past the context) fails here."""
    from quantkit.targets.registry import TARGETS

    manifest = default_ship.manifest
    assert default_ship.ok, [a.failures for a in default_ship.artifacts]
    assert sorted(a["target"].split(":")[0] for a in manifest["artifacts"]) == sorted(TARGETS)
    assert all(a["verdict"] == "accepted" and a["metrics"]["top1"] > 0.8 for a in manifest["artifacts"])
    assert manifest["data"]["eval"]["seq_len"] == ModelSource().config["max_position_embeddings"] == 512
