"""Calibration statistics: X^T X and mean squares of each linear's inputs, from one pass."""

import torch

from quantkit.calibrate import collect_statistics
from quantkit.data import make_samples
from quantkit.model import ModelSource


def test_statistics_equal_captured_inputs(tiny_models):
    src = ModelSource(tiny_models["llama"])
    model = src.hf_model()
    samples = make_samples(src.tokenizer(), "builtin", "calib", 2, 16)
    names = src.arch.linear_weights(0) + src.arch.linear_weights(1)
    stats = collect_statistics(model, samples, names)
    assert set(stats) == set(names)

    captured = []
    down = dict(model.named_modules())["model.layers.1.mlp.down_proj"]
    handle = down.register_forward_hook(lambda _m, args, _o: captured.append(args[0].reshape(-1, 256)))
    with torch.no_grad():
        for row in samples.ids:
            model(input_ids=row[None])
    handle.remove()
    x = torch.cat(captured).double()
    s = stats["model.layers.1.mlp.down_proj.weight"]
    assert s.tokens == 32
    # per-sequence products are taken in fp32 (then summed in fp64): fp32 rounding bounds the match
    torch.testing.assert_close(s.gram, x.T @ x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.mean_square, (x**2).mean(0), rtol=1e-5, atol=1e-6)
    # q, k and v read the same normalized input, so their statistics agree
    q, v = stats["model.layers.0.self_attn.q_proj.weight"], stats["model.layers.0.self_attn.v_proj.weight"]
    assert torch.equal(q.gram, v.gram)


def test_pipeline_collects_statistics_once_for_all_grids(monkeypatch, tiny_models, tmp_path):
    import quantkit
    from quantkit.calibrate import LinearStats
    from quantkit.methods import METHODS, RoundToNearest

    received: dict[str, set[int]] = {}

    class NeedsStats(RoundToNearest):
        name = "needs-stats"
        needs_statistics = True

        def quantize_weight(self, weight, grid, stats=None):
            assert isinstance(stats, LinearStats) and stats.tokens == 2 * 32
            received.setdefault(grid.name, set()).add(id(stats))
            return super().quantize_weight(weight, grid)

    monkeypatch.setitem(METHODS, "needs-stats", NeedsStats)
    # GGUF file types also quantize embedding and output, which have no input statistics: keep them F16
    result = quantkit.ship(tiny_models["llama"], targets=["gguf:Q8_0", "gguf:Q4_0"], out=tmp_path / "o",
                           method="needs-stats", calib_samples=2, eval_samples=1, seq_len=32,
                           exclude=["model.embed_tokens.weight", "lm_head.weight"],
                           max_ppl_increase_pct=1e9, max_kld=1e9, min_top1=0.0)
    assert result.manifest["data"]["calibration"]["samples"] == 2
    # both grids were handed the very same statistics objects: collected once per run
    assert received["Q8_0"] == received["Q4_0"] and len(received["Q8_0"]) == 14
