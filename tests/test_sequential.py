"""Layer-by-layer quantization: each layer's statistics come from already-quantized predecessors."""

import torch

from quantkit.calibrate import collect_statistics
from quantkit.data import make_samples
from quantkit.grids import IntGrid
from quantkit.methods import RoundToNearest
from quantkit.model import ModelSource
from quantkit.sequential import quantize_sequential


def test_statistics_see_quantized_predecessors(tiny_models):
    src = ModelSource(tiny_models["llama"])
    samples = make_samples(src.tokenizer(), "builtin", "calib", 2, 16)
    names = src.arch.linear_weights(0) + src.arch.linear_weights(1)
    grid = IntGrid(bits=2, group_size=32, symmetric=False)  # coarse, so quantization visibly moves activations
    seen = {}

    def recording_rtn(weight, grid, stats=None):
        seen[len(seen)] = stats
        return RoundToNearest().quantize_weight(weight, grid)

    model = src.hf_model()
    method = RoundToNearest()
    method.quantize_weight = recording_rtn  # a per-linear method that records what it was given
    results = quantize_sequential(model, src.arch, samples.ids, names, grid, method.quantize_block).quantized
    assert list(results) == names  # execution order: q, k, v, o, gate, up, down per block
    # the model now holds the dequantized weights; a plain pass over it reproduces the statistics
    # each linear saw during the sequential run (block 1 sees quantized block 0, o_proj sees quantized q/k/v)
    replay = collect_statistics(model, samples, names)
    unquantized = collect_statistics(src.hf_model(), samples, names)
    for i, name in enumerate(names):
        torch.testing.assert_close(seen[i].gram, replay[name].gram, rtol=1e-5, atol=1e-6)
    later = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(replay[later].gram, unquantized[later].gram, rtol=1e-3)
    first = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(replay[first].gram, unquantized[first].gram)  # nothing precedes block 0


def test_streamed_model_matches_the_whole_model(tiny_models):
    """One block in memory at a time gives the same logits and the same GPTQ result as the whole model."""
    from quantkit.methods import GPTQ
    from quantkit.streaming import BlockStreamer, streamed_logits

    ids = torch.randint(1, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    for name, path in tiny_models.items():
        src = ModelSource(path)
        with torch.no_grad():
            whole = src.hf_model()(input_ids=ids).logits
        streamer = BlockStreamer(src)
        first_linear = streamer.blocks[0].get_submodule(src.arch.linears[0])
        assert first_linear.weight.is_meta  # nothing of a block is loaded up front
        for row, logits in zip(whole, streamed_logits(streamer, ids), strict=True):
            torch.testing.assert_close(logits, row, msg=name)
        assert all(p.is_meta for p in streamer.blocks.parameters())  # every block released again

    src = ModelSource(tiny_models["llama"])
    names = src.arch.linear_weights(0) + src.arch.linear_weights(1)
    grid = IntGrid(bits=4, group_size=32)
    samples = make_samples(src.tokenizer(), "builtin", "calib", 2, 16)
    whole = quantize_sequential(src.hf_model(), src.arch, samples.ids, names, grid, GPTQ().quantize_block)
    streamer = BlockStreamer(src)
    streamed = quantize_sequential(streamer.model, src.arch, samples.ids, names, grid, GPTQ().quantize_block,
                                   streamer=streamer)
    for n in names:
        assert torch.equal(whole.quantized[n].codes, streamed.quantized[n].codes), n
    assert all(p.is_meta for p in streamer.blocks.parameters())
