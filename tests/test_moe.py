"""Mixture-of-experts models (Mixtral, Qwen3-MoE): quantkit's per-expert modules compute what transformers
computes, each expert is calibrated on the tokens routed to it with a fallback for rare experts, and AWQ
keeps the routing exact when it folds scales through the router."""

import json

import pytest
import torch

from quantkit.model import ModelSource
from quantkit.streaming import BlockStreamer, streamed_logits
from quantkit_testing.models import TINY_CONFIGS, save_tiny


@pytest.mark.parametrize("family,options", [("mixtral", {}), ("qwen3_moe", {}),
                                            ("qwen3_moe", {"norm_topk_prob": False})])
def test_streamed_experts_compute_what_transformers_computes(tmp_path, family, options):
    config = TINY_CONFIGS[family]()
    for key, value in options.items():
        setattr(config, key, value)
    path = save_tiny(tmp_path / family, config)
    source = ModelSource(path)
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source.hf_model()(input_ids=ids).logits
    got = torch.stack(list(streamed_logits(BlockStreamer(source), ids)))
    # both are fp32 with the same routing; only summation order differs (measured max 5e-6)
    assert (got - expected).abs().max() < 1e-4


def test_expert_names_cover_the_checkpoint(tiny_models):
    source = ModelSource(tiny_models["mixtral"])
    arch = source.arch
    linears = {n for i in range(source.n_layers) for n in arch.linear_weights(i)}
    experts = {n for n in source.tensors if ".experts." in n}
    assert experts <= linears and len(experts) == 8 * 3 * source.n_layers
    assert arch.checkpoint_name("model.layers.1.block_sparse_moe.experts.7.w3.weight") == \
        "model.layers.1.mlp.experts.7.up_proj.weight"
    assert arch.checkpoint_name("model.layers.0.block_sparse_moe.gate.weight") == "model.layers.0.mlp.gate.weight"


def test_an_expert_no_token_reaches_is_calibrated_on_all_tokens(tiny_models):
    from quantkit.sequential import BlockJob, capture_block_calls, group_statistics, shared_input_statistics

    source = ModelSource(tiny_models["qwen3_moe"])
    arch = source.arch
    streamer = BlockStreamer(source)
    ids = torch.randint(0, 4096, (8, 64), generator=torch.Generator().manual_seed(1))
    calls = capture_block_calls(streamer.model, streamer.blocks, ids)
    block = streamer.load_block(0)
    # the router's logit for expert 3 pushed to -inf: it never gets a token
    block.get_submodule(arch.experts.router_name).register_forward_hook(
        lambda _m, _a, out: out.index_fill(1, torch.tensor([3]), float("-inf")))
    job = BlockJob(block, arch.block(0), arch, list(arch.linears), calls.inputs(0, calls.first_inputs), None)
    gate, up, down = (arch.experts.linear(3, p) for p in ("gate", "up", "down"))
    assert shared_input_statistics(block, [gate, up], job.inputs).tokens == 0
    assert group_statistics(job, [gate, up]).tokens == ids.numel() and job.fallbacks == {3}
    assert group_statistics(job, [down]).tokens == ids.numel()
    # a frequent expert keeps its own tokens
    counts = {e: shared_input_statistics(block, [arch.experts.linear(e, "gate")], job.inputs).tokens
              for e in range(16)}
    busiest = max(counts, key=counts.get)
    assert counts[busiest] >= 64 and group_statistics(job, [arch.experts.linear(busiest, "gate")]).tokens == \
        counts[busiest]
    assert sum(counts.values()) == 2 * ids.numel()  # two experts per token


def test_awq_folds_scales_through_the_router_exactly(tiny_models, tmp_path):
    """The norm before the experts is divided by AWQ's scale and every consumer multiplied by it, the
    unquantized router included: router logits = router @ (norm * x_hat) must not change."""
    import quantkit

    source = ModelSource(tiny_models["qwen3_moe"])
    result = quantkit.ship(source.path, targets=["hf-awq"], out=tmp_path / "o", method="awq", group_size=32,
                           calib_samples=2, seq_len=64, verify=False, progress=False)
    assert result.ok
    from safetensors.torch import load_file

    from quantkit.targets.hf_checkpoint import WEIGHTS

    written = load_file(result.out_dir / "hf-awq" / WEIGHTS)
    for i in range(source.n_layers):
        norm_new = written[f"model.layers.{i}.post_attention_layernorm.weight"].float()
        router_new = written[f"model.layers.{i}.mlp.gate.weight"].float()
        norm_old = source.load(f"model.layers.{i}.post_attention_layernorm.weight")
        router_old = source.load(f"model.layers.{i}.mlp.gate.weight")
        assert not torch.allclose(norm_new, norm_old.half().float())  # AWQ did rescale
        # fp16 storage: relative error ~1e-3
        torch.testing.assert_close(router_new * norm_new, router_old * norm_old, rtol=5e-3, atol=5e-3)


def test_rare_experts_are_listed_in_the_manifest(tiny_models, tmp_path):
    import quantkit

    result = quantkit.ship(tiny_models["qwen3_moe"], targets=["gguf:Q4_K_M"], out=tmp_path / "o", method="gptq",
                           calib_samples=2, seq_len=64, verify=False, progress=False)
    fallback = json.loads((result.out_dir / "manifest.json").read_text())["data"]["calibration"][
        "experts_on_all_tokens"]
    # 128 calibration tokens, 2 of 16 experts each: 16 per expert on average, so most fall back
    assert fallback["min_tokens"] == 64 and set(fallback["blocks"]) == {"0", "1"}
    assert all(0 < len(experts) <= 16 for experts in fallback["blocks"].values())


def test_loading_quantized_experts_leaves_transformers_unpatched(tiny_models, tmp_path):
    """gptqmodel's defuser patches transformers' MoE classes globally; quantkit's check puts them back."""
    import transformers.models.mixtral.modeling_mixtral as mixtral

    import quantkit
    from quantkit.model import ModelSource as Source

    original = mixtral.MixtralSparseMoeBlock
    result = quantkit.ship(tiny_models["mixtral"], targets=["hf-gptq"], out=tmp_path / "o", bits=8, group_size=32,
                           eval_samples=1, seq_len=32, max_kld=0.02, progress=False)
    assert result.ok and mixtral.MixtralSparseMoeBlock is original
    saved = save_tiny(tmp_path / "again", TINY_CONFIGS["mixtral"]())
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in Source(saved).tensors
