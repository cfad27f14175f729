"""GPTQ as pure math: lower output error than round-to-nearest on every grid, act-order, static
groups, and damping retries."""

import pytest
import torch

from quantkit.grids import GGUF_GRIDS, IntGrid
from quantkit.methods import RoundToNearest
from quantkit.methods.gptq import GPTQ, CholeskyRetryWarning, GPTQConfig, gptq_quantize
from quantkit_testing.helpers import correlated_inputs, output_error, stats_of


def code_range(grid) -> tuple[int, int]:
    if isinstance(grid, IntGrid):
        return grid.qmin, grid.qmax
    return (-128, 127) if grid.name == "Q8_0" else (0, 2**grid.bits - 1)


GRIDS = {
    "int4-g32-sym": IntGrid(bits=4, group_size=32, symmetric=True),
    "int4-g64-asym": IntGrid(bits=4, group_size=64, symmetric=False),
    "int3-g128": IntGrid(bits=3, group_size=128, symmetric=False),
    "int2-g32": IntGrid(bits=2, group_size=32, symmetric=False),
    "int8-channel": IntGrid(bits=8, group_size=-1, symmetric=True),
    "int4-tensor": IntGrid(bits=4, group_size=0, symmetric=True),
    "Q4_0": GGUF_GRIDS["Q4_0"],
    "Q4_1": GGUF_GRIDS["Q4_1"],
    "Q5_0": GGUF_GRIDS["Q5_0"],
}


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(grid_name, act_order):
    grid = GRIDS[grid_name]
    x = correlated_inputs(512, 256)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    rtn = RoundToNearest().quantize_weight(w, grid)
    gptq = GPTQ(GPTQConfig(act_order=act_order)).quantize_weight(w, grid, stats_of(x))
    assert gptq.codes.shape == w.shape
    low, high = code_range(grid)
    assert low <= gptq.codes.min() and gptq.codes.max() <= high
    wq = gptq.dequantize()
    assert torch.isfinite(wq).all()
    assert output_error(x, w, wq) < 0.9 * output_error(x, w, rtn.dequantize())
    if grid.contiguous_groups_only or grid.group_size <= 0:
        assert gptq.g_idx is None
    elif act_order:
        assert gptq.g_idx is not None and gptq.g_idx.shape == (256,)


def test_static_groups_fit_parameters_on_the_original_weights():
    grid = IntGrid(bits=4, group_size=64, symmetric=True)
    x = correlated_inputs(256, 256, seed=3)
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(4)) * 0.05
    static = gptq_quantize(w, stats_of(x).gram, grid, GPTQConfig(static_groups=True, act_order=True))
    rtn = RoundToNearest().quantize_weight(w, grid)
    assert static.g_idx is None  # static groups stay consecutive even with act-order
    torch.testing.assert_close(static.params.scale, rtn.params.scale)
    assert output_error(x, w, static.dequantize()) < output_error(x, w, rtn.dequantize())


def test_act_order_groups_follow_the_hessian_diagonal():
    grid = IntGrid(bits=4, group_size=32)
    x = correlated_inputs(256, 128, seed=5)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(6)) * 0.05
    qw = gptq_quantize(w, stats_of(x).gram, grid, GPTQConfig(act_order=True))
    order = torch.argsort(torch.diagonal(stats_of(x).gram), descending=True)
    # the 32 columns with the largest diagonal form group 0, the next 32 group 1, ...
    assert torch.equal(qw.g_idx[order], torch.arange(128) // 32)
    assert torch.bincount(qw.g_idx).tolist() == [32, 32, 32, 32]


def test_dead_input_channel_is_zeroed():
    x = correlated_inputs(256, 64, seed=7)
    x[:, 5] = 0.0
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(8))
    qw = gptq_quantize(w, stats_of(x).gram, IntGrid(bits=4, group_size=32), GPTQConfig())
    assert torch.isfinite(qw.dequantize()).all()
    assert (qw.dequantize()[:, 5] == 0).all()  # a channel that never fires carries no weight


def test_cholesky_failure_retries_with_more_damping():
    # 16 tokens for 128 inputs: X^T X has rank 16, so tiny damping leaves it numerically singular
    x = correlated_inputs(16, 128, seed=9)
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(10))
    with pytest.warns(CholeskyRetryWarning, match="succeeded with"):
        qw = gptq_quantize(w, stats_of(x).gram, IntGrid(bits=4, group_size=32), GPTQConfig(damp_percent=1e-9))
    assert torch.isfinite(qw.dequantize()).all()


def test_gptq_requires_statistics():
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="needs calibration statistics"):
        GPTQ().quantize_weight(torch.randn(4, 32), IntGrid(bits=4, group_size=32), None)
