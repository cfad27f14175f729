"""AWQ: exact scale folding, clipping search, and block error no worse than round-to-nearest."""

import torch

from quantkit.data import make_samples
from quantkit.grids import GGUF_GRIDS, IntGrid
from quantkit.methods import AWQ, RoundToNearest
from quantkit.methods.awq import _fold, clipped_params
from quantkit.methods.base import grouped
from quantkit.model import ModelSource
from quantkit.sequential import BlockJob, capture_block_inputs


def first_block_job(model_dir, grid):
    src = ModelSource(model_dir)
    model = src.hf_model()
    samples = make_samples(src.tokenizer(), "builtin", "calib", 2, 32)
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, model.model.layers, samples.ids)
    return BlockJob(block, "model.layers.0.", src.arch, list(src.arch.linears), inputs, grid)


def test_folding_a_scale_keeps_the_block_output(tiny_models):
    job = first_block_job(tiny_models["llama"], IntGrid(bits=4, group_size=32))
    before = job.run()
    g = torch.Generator().manual_seed(0)
    for fold in job.arch.fold_points:
        width = job.block.get_submodule(fold.consumers[0]).in_features
        producer = job.block.get_submodule(fold.producer)
        if getattr(producer, "out_features", width) != width:
            continue  # v_proj -> o_proj under GQA: not foldable
        with torch.no_grad():
            _fold(job, fold.producer, list(fold.consumers), torch.rand(width, generator=g) + 0.5)
    for a, b in zip(before, job.run(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_clipping_never_worse_than_full_range():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=g) * 0.05
    w[:, 7] = 0.5  # an outlier column stretches every group's range
    x = torch.randn(256, 128, generator=g)
    xg = x.reshape(256, 4, 32).transpose(0, 1)

    def err(grid, params):
        groups = grouped(w, grid)
        deq = grid.decode(grid.encode(groups, params), params)
        return (torch.einsum("ntg,rng->rnt", xg, groups - deq) ** 2).sum(-1)

    for grid in (IntGrid(bits=4, group_size=32, symmetric=False), GGUF_GRIDS["Q4_0"]):
        clipped = err(grid, clipped_params(w, x, grid, AWQ().config))
        full = err(grid, grid.fit(grouped(w, grid)))
        assert (clipped <= full + 1e-6).all()
        assert clipped.sum() < full.sum()


def test_awq_block_error_not_worse_than_rtn(tiny_models):
    grid = IntGrid(bits=3, group_size=32, symmetric=False)
    reference_job = first_block_job(tiny_models["llama"], grid)
    reference = reference_job.run()

    def block_error(job):
        return sum(float(((o - r) ** 2).mean()) for o, r in zip(job.run(), reference, strict=True))

    rtn_job = first_block_job(tiny_models["llama"], grid)
    for name in rtn_job.members:
        module = rtn_job.block.get_submodule(name)
        module.weight.data = RoundToNearest().quantize_weight(module.weight.float(), grid).dequantize()
    awq_job = first_block_job(tiny_models["llama"], grid)
    result = AWQ().quantize_block(awq_job)
    assert set(result.quantized) == set(awq_job.members)
    assert set(result.replaced) == {"input_layernorm.weight", "post_attention_layernorm.weight"}
    assert block_error(awq_job) < block_error(rtn_job)
