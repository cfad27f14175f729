"""GPTQ on GGUF grids, end to end: the file loads in llama.cpp and beats round-to-nearest there."""

import pytest

import quantkit


@pytest.fixture(scope="module")
def q4_0_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    common = dict(targets=["gguf:Q4_0"], eval_samples=8, calib_samples=16, seq_len=512)
    rtn = quantkit.ship(out=root / "rtn", method="rtn", **common)
    gptq = quantkit.ship(out=root / "gptq", method="gptq", **common)
    return rtn, gptq


def test_gptq_q4_0_beats_rtn_in_llama_cpp(q4_0_runs):
    rtn, gptq = (r.artifacts[0].metrics for r in q4_0_runs)
    assert gptq["perplexity"] < rtn["perplexity"]
    assert gptq["kld"] < rtn["kld"]


def test_gptq_manifest_records_calibration(q4_0_runs):
    _, gptq = q4_0_runs
    assert gptq.ok
    calib = gptq.manifest["data"]["calibration"]
    assert calib["samples"] == 16 and calib["tokens"] == 16 * 512
    assert gptq.manifest["recipe"]["method"] == "gptq"
    assert gptq.artifacts[0].tokenizer_check["match"]
