"""Calibration / evaluation text: the stdlib split and user files."""

import json

import pytest
import torch

from quantkit import data
from quantkit.errors import QuantkitError
from quantkit.model import ModelSource


def test_split_is_deterministic_and_disjoint():
    splits = {s: data.stdlib_files(s) for s in data.SPLITS}
    assert all(splits.values())
    sets = {s: set(files) for s, files in splits.items()}
    assert not sets["train"] & sets["calib"]
    assert not sets["train"] & sets["eval"]
    assert not sets["calib"] & sets["eval"]
    assert data.stdlib_files("eval") == splits["eval"]  # same call, same order
    root = data.stdlib_root()
    for path in splits["eval"]:
        rel = path.relative_to(root)
        assert not {"test", "tests", "site-packages"} & set(rel.parts)
        assert data.split_of(rel.as_posix()) == "eval"


def test_split_of_uses_the_path_hash():
    # sha256("json/decoder.py")[:8] as an integer, mod 100, picks the bucket
    import hashlib

    bucket = int(hashlib.sha256(b"json/decoder.py").hexdigest()[:8], 16) % 100
    expected = "train" if bucket < 90 else "calib" if bucket < 95 else "eval"
    assert data.split_of("json/decoder.py") == expected


@pytest.fixture(scope="module")
def tokenizer():
    return ModelSource().tokenizer()


def test_samples_are_deterministic(tokenizer):
    a = data.make_samples(tokenizer, "builtin", "eval", 3, 64)
    b = data.make_samples(tokenizer, "builtin", "eval", 3, 64)
    assert a.ids.shape == (3, 64) and a.ids.dtype == torch.int64
    assert torch.equal(a.ids, b.ids) and a.sha256 == b.sha256


def test_user_files_txt_jsonl_and_folder(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x * 2\n" * 20)
    with (tmp_path / "b.jsonl").open("w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"value_{i} = {i} + 1\n"}) + "\n")
    assert data.load_documents(tmp_path / "a.txt", "eval") == [(tmp_path / "a.txt").read_text()]
    assert len(data.load_documents(tmp_path / "b.jsonl", "eval")) == 20
    assert len(data.load_documents(tmp_path, "eval")) == 21
    samples = data.make_samples(tokenizer, tmp_path, "eval", 2, 32)
    assert samples.ids.shape == (2, 32)


def test_too_little_text_is_a_clear_error(tokenizer, tmp_path):
    (tmp_path / "short.txt").write_text("x = 1\n")
    with pytest.raises(QuantkitError, match="need 2048"):
        data.make_samples(tokenizer, tmp_path / "short.txt", "eval", 4, 512)


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    with pytest.raises(QuantkitError, match=r"bad.jsonl:2 has no string \"text\" field"):
        data.load_documents(tmp_path / "bad.jsonl", "eval")


def test_missing_source_and_wrong_suffix(tmp_path):
    with pytest.raises(QuantkitError, match="does not exist"):
        data.load_documents(tmp_path / "nope.txt", "eval")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(QuantkitError, match="unsupported text file"):
        data.load_documents(tmp_path / "x.csv", "eval")
