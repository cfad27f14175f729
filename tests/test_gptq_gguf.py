"""GPTQ on GGUF grids, end to end: the file loads in llama.cpp and beats round-to-nearest there."""

import pytest

import quantkit


@pytest.fixture(scope="module")
def q4_0_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    common = dict(targets=["gguf:Q4_0"], eval_samples=8, calib_samples=16, seq_len=512)
    rtn = quantkit.ship(out=root / "rtn", method="rtn", **common)
    gptq = quantkit.ship(out=root / "gptq", method="gptq", **common)
    awq = quantkit.ship(out=root / "awq", method="awq", **common)
    return rtn, gptq, awq


def test_gptq_q4_0_beats_rtn_in_llama_cpp(q4_0_runs):
    rtn, gptq, _ = (r.artifacts[0].metrics for r in q4_0_runs)
    assert gptq["perplexity"] < rtn["perplexity"]
    assert gptq["kld"] < rtn["kld"]


def test_gptq_manifest_records_calibration(q4_0_runs):
    _, gptq, _ = q4_0_runs
    assert gptq.ok
    calib = gptq.manifest["data"]["calibration"]
    assert calib["samples"] == 16 and calib["tokens"] == 16 * 512
    assert gptq.manifest["recipe"]["method"] == "gptq"
    assert gptq.artifacts[0].tokenizer_check["match"]


def test_awq_scaled_weights_feed_a_gguf_file(q4_0_runs):
    """AWQ's folded scales land in the GGUF (rescaled norms) and llama.cpp runs it within the gate."""
    import gguf
    import numpy as np

    from quantkit.model import ModelSource

    rtn, _, awq = q4_0_runs
    assert awq.ok and awq.artifacts[0].tokenizer_check["match"]
    read = {t.name: t for t in gguf.GGUFReader(awq.out_dir / awq.artifacts[0].path).tensors}
    original = ModelSource().load("model.layers.0.input_layernorm.weight").numpy()
    assert not np.allclose(np.asarray(read["blk.0.attn_norm.weight"].data), original)
    assert awq.artifacts[0].metrics["kld"] < 2 * rtn.artifacts[0].metrics["kld"]
