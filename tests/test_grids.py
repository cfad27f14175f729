"""Integer grids and round-to-nearest against hand-worked values."""

import pytest
import torch

from quantkit.grids import PER_CHANNEL, PER_TENSOR, IntGrid, QuantizedWeight, QuantParams
from quantkit.methods import RoundToNearest

RTN = RoundToNearest()


def test_absmax_int4_by_hand():
    # max |w| = 1.5 -> scale = 1.5 / 7.5 = 0.2; w / scale = [-7.5, -2.5, 0.5, 3.5] -> half-to-even [-8, -2, 0, 4]
    w = torch.tensor([[-1.5, -0.5, 0.1, 0.7]])
    qw = RTN.quantize_weight(w, IntGrid(bits=4, group_size=4, symmetric=True))
    assert qw.codes.tolist() == [[-8, -2, 0, 4]]
    assert torch.allclose(qw.params.scale.flatten(), torch.tensor([0.2]))
    assert torch.allclose(qw.dequantize(), torch.tensor([[-1.6, -0.4, 0.0, 0.8]]))


def test_zero_point_int2_by_hand():
    # range [-0.5, 1.0] -> scale = 1.5 / 3 = 0.5, zero = round(0.5 / 0.5) = 1
    # codes = round(w / 0.5) + 1 = [0, 1, 2, 3]
    w = torch.tensor([[-0.5, 0.1, 0.4, 1.0]])
    qw = RTN.quantize_weight(w, IntGrid(bits=2, group_size=4, symmetric=False))
    assert qw.codes.tolist() == [[0, 1, 2, 3]]
    assert qw.params.zero.flatten().tolist() == [1.0]
    assert torch.allclose(qw.dequantize(), torch.tensor([[-0.5, 0.0, 0.5, 1.0]]))


def test_zero_point_range_includes_zero():
    # all-positive group: min is stretched to 0 so that 0 is exactly representable (zero code 0)
    w = torch.tensor([[0.3, 0.6, 0.9, 1.5]])
    qw = RTN.quantize_weight(w, IntGrid(bits=8, group_size=4, symmetric=False))
    assert qw.params.zero.item() == 0
    assert torch.allclose(qw.params.scale.flatten(), torch.tensor([1.5 / 255]))


def test_int8_codes_saturate_range():
    w = torch.tensor([[-7.96875, 7.96875, 1.0, 0.0]])  # max 255/32, so the scale is exactly 1/16
    sym = RTN.quantize_weight(w, IntGrid(bits=8, group_size=-1, symmetric=True))
    # scale 7.96875 / 127.5 = 0.0625: +-127.5 round half to even to +-128 (+128 clamps to 127); 1.0 -> 16
    assert sym.params.scale.item() == 0.0625
    assert sym.codes.tolist() == [[-128, 127, 16, 0]]
    # range [-1, 3]: scale 4/255, zero = round(63.75) = 64; codes round(w*255/4) + 64
    asym = RTN.quantize_weight(torch.tensor([[-1.0, 3.0, 1.0, 0.0]]), IntGrid(bits=8, group_size=-1, symmetric=False))
    assert asym.codes.tolist() == [[0, 255, 128, 64]]


def test_groups_per_channel_and_per_tensor():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    group2 = RTN.quantize_weight(w, IntGrid(bits=4, group_size=2))
    assert group2.params.scale.shape == (2, 2, 1)
    assert torch.allclose(group2.params.scale.squeeze(-1), torch.tensor([[2, 4], [20, 40]]) / 7.5)
    channel = RTN.quantize_weight(w, IntGrid(bits=4, group_size=PER_CHANNEL))
    assert torch.allclose(channel.params.scale.flatten(), torch.tensor([4, 40]) / 7.5)
    tensor = RTN.quantize_weight(w, IntGrid(bits=4, group_size=PER_TENSOR))
    assert torch.allclose(tensor.params.scale.flatten(), torch.tensor([40 / 7.5]))
    # per tensor: the small row collapses onto few codes, [1, 2, 3, 4] / (40/7.5) = [.19, .38, .56, .75]
    assert tensor.codes[0].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_bound_every_bit_width(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(16, 64)
    grid = IntGrid(bits=bits, group_size=32, symmetric=symmetric)
    qw = RTN.quantize_weight(w, grid)
    assert qw.codes.min() >= grid.qmin and qw.codes.max() <= grid.qmax
    # round-to-nearest inside the clipping range is off by at most half a step
    step = qw.params.scale.expand(16, 2, 32).reshape(16, 64)
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_zero_group_decodes_to_zero():
    qw = RTN.quantize_weight(torch.zeros(2, 8), IntGrid(bits=4, group_size=8))
    assert torch.equal(qw.dequantize(), torch.zeros(2, 8))


def test_group_size_must_divide_row():
    with pytest.raises(ValueError, match="does not divide"):
        RTN.quantize_weight(torch.randn(4, 96), IntGrid(bits=4, group_size=64))


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="between 2 and 8"):
        IntGrid(bits=bits)


def test_permute_rows_keeps_rows_with_their_parameters():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    qw = RTN.quantize_weight(w, IntGrid(bits=4, group_size=16))
    order = torch.randperm(8)
    assert torch.equal(qw.permute_rows(order).dequantize(), qw.dequantize()[order])


@pytest.mark.parametrize("low,high,dtype", [(-128, 127, torch.int8), (0, 255, torch.uint8), (-32, 200, torch.int16)])
def test_compact_codes_keep_every_value(low, high, dtype):
    codes = torch.tensor([[low, high, 0, 1]], dtype=torch.int32)
    grid = IntGrid(bits=8, group_size=4)
    qw = QuantizedWeight(codes, QuantParams(scale=torch.ones(1, 1, 1)), grid)
    small = qw.compact()
    assert small.codes.dtype == dtype and small.widened().codes.dtype == torch.int32
    assert torch.equal(small.widened().codes, codes) and torch.equal(small.dequantize(), qw.dequantize())
