"""Each family beyond Llama end to end: quantized, exported to every target that can express it, and
checked in that target's runtime (tiny random checkpoints: the default gates are off; each artifact's KL
divergence from the unquantized model, measured by the pipeline in the artifact's runtime, is bounded
below what a wrongly laid-out model scores)."""

import math

import pytest

import quantkit
from quantkit_testing.runtimes import require

require("llama_cpp")
require("gptqmodel")

# family -> targets that can express it (the others must refuse it by name)
FAMILY_TARGETS = {  # family -> (method, targets)
    "qwen3": ("gptq", ["gguf:Q8_0", "gguf:Q4_K_M", "hf-gptq", "onnx"]),
    "phi3": ("gptq", ["gguf:Q8_0", "gguf:Q3_K_M", "hf-gptq", "executorch"]),
    "gemma2": ("gptq", ["gguf:Q8_0", "gguf:Q4_K_M", "hf-gptq", "executorch"]),
    # AWQ folds its scales through Gemma's (1 + weight) norms
    "gemma3": ("awq", ["gguf:Q8_0", "gguf:Q4_K_M", "hf-awq"]),
    # mixture of experts: each expert calibrated on its own tokens (GPTQ), AWQ's scales folded through the router
    "mixtral": ("gptq", ["gguf:Q8_0", "gguf:Q4_K_M", "hf-gptq"]),
    "qwen3_moe": ("awq", ["gguf:Q8_0", "gguf:Q4_K_M", "hf-awq"]),
}
REFUSED = {
    "phi3": {"onnx": "onnx cannot express phi3 models yet (fused qkv and gate_up linears"},
    "gemma2": {"onnx": "onnx cannot express gemma2 models yet (gelu_tanh activation, offset norms",
               # the tiny config's window (Gemma 2's 4096) is longer than its 128-position context
               "onnx-genai": "sliding_window 4096 is longer than the model's context"},
    "gemma3": {"ort": "ort cannot express gemma3 models yet (gelu_tanh activation, offset norms"},
    "mixtral": {"onnx": "onnx cannot express mixtral models yet (mixture of experts not in its graph",
                "onnx-genai": "onnxruntime-genai's model builder has no CPU model for mixtral",
                "executorch": "executorch:8da4w cannot express mixtral models yet (mixture of experts"},
    "qwen3_moe": {"executorch": "executorch:8da4w cannot express qwen3_moe models yet (mixture of experts"},
}
NO_GATE = dict(max_ppl_increase_pct=1e9, max_kld=1e9, min_top1=0.0)


@pytest.mark.parametrize("family", sorted(FAMILY_TARGETS))
def test_family_ships_to_every_target_that_can_express_it(tiny_models, tmp_path, family):
    method, targets = FAMILY_TARGETS[family]
    result = quantkit.ship(tiny_models[family], targets=targets, out=tmp_path / "o", method=method,
                           group_size=32, calib_samples=2, eval_samples=2, seq_len=64, **NO_GATE)
    assert result.ok and result.manifest["model"]["architecture"] == family
    for art in result.artifacts:
        assert (result.out_dir / art.path).exists()
        # Random tiny models predict near-uniformly (entropy ~7.8 of 8.3 nats), so top-1 says little; the
        # KLD between two random draws of these configs measures 0.83-1.65, which is what a tensor in the
        # wrong layout scores. 8-bit artifacts sit two orders below that, 3-4-bit ones well under half.
        bound = 0.02 if art.bits_per_weight >= 7.5 else 0.5
        assert math.isfinite(art.metrics["perplexity"]) and art.metrics["kld"] < bound, (art.target, art.metrics)
        if art.tokenizer_check is not None:
            assert art.tokenizer_check["match"], art.target


@pytest.mark.parametrize("family", sorted(FAMILY_TARGETS))
def test_family_f32_gguf_computes_what_transformers_computes(tiny_models, tmp_path, family):
    # llama.cpp's own graph for the family (norm offsets, rope layout, soft-capping, q/k norms, fused
    # linears) against transformers' forward on the same F32 weights: only float summation order differs
    # between the two, so the distributions agree to ~1e-6 KLD on this tiny model; 1e-4 leaves room for
    # threads and still fails on any wrong tensor, name or hyperparameter (those give KLD > 0.01).
    result = quantkit.ship(tiny_models[family], targets=["gguf:F32"], out=tmp_path / "o", eval_samples=2,
                           seq_len=64)
    metrics = result.artifacts[0].metrics
    assert metrics["kld"] < 1e-4 and metrics["top1"] > 0.99, metrics


@pytest.mark.parametrize("family,target", [(f, t) for f, targets in REFUSED.items() for t in targets])
def test_family_a_target_cannot_express_is_refused_by_name(tiny_models, tmp_path, family, target):
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match=REFUSED[family][target].replace("(", r"\(")):
        quantkit.ship(tiny_models[family], targets=[target], out=tmp_path / "o", eval_samples=1, seq_len=32,
                      group_size=32)
    assert not (tmp_path / "o").exists()
