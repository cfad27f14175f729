"""GPTQ v1 / AWQ GEMM packed layouts: hand-worked words and round trips through the references."""

import pytest
import torch

from quantkit.calibrate import LinearStats
from quantkit.grids import IntGrid
from quantkit.methods import RoundToNearest
from quantkit.methods.gptq import GPTQConfig, gptq_quantize
from quantkit.packing import (
    AWQ_ORDER,
    gptq_dequantize,
    pack_along_columns,
    pack_along_rows,
    unpack_along_columns,
    unpack_along_rows,
)
from quantkit.targets.hf_gptq import gptq_tensors


def test_rows_pack_into_nibbles_by_hand():
    values = torch.arange(8, dtype=torch.int32).view(8, 1)  # rows 0..7 of one column
    assert pack_along_rows(values, 4).item() == 0x76543210
    values = torch.full((8, 1), 15, dtype=torch.int32)
    assert pack_along_rows(values, 4).item() == -1  # 0xFFFFFFFF as int32


def test_awq_order_by_hand():
    values = torch.arange(8, dtype=torch.int32).view(1, 8)  # columns 0..7 of one row
    # slot k holds column AWQ_ORDER[k] = 0, 2, 4, 6, 1, 3, 5, 7
    assert pack_along_columns(values, 4, AWQ_ORDER).item() == 0x75316420


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 32), generator=g, dtype=torch.int32)
    assert torch.equal(unpack_along_rows(pack_along_rows(values, bits), bits), values)
    assert torch.equal(unpack_along_columns(pack_along_columns(values, bits), bits), values)
    if bits == 4:
        packed = pack_along_columns(values, 4, AWQ_ORDER)
        assert torch.equal(unpack_along_columns(packed, 4, AWQ_ORDER), values)


def test_three_bits_are_refused():
    with pytest.raises(ValueError, match="do not pack evenly"):
        pack_along_rows(torch.zeros(32, 4, dtype=torch.int32), 3)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_gptq_layout_decodes_to_the_quantized_weight(bits, symmetric, group_size):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0)) * 0.1
    grid = IntGrid(bits=bits, group_size=group_size, symmetric=symmetric, fp16_scales=True, min_zero=1)
    qw = RoundToNearest().quantize_weight(w, grid)
    t = gptq_tensors(qw)
    assert t["qweight"].shape == (128 * bits // 32, 48) and t["qweight"].dtype == torch.int32
    assert t["scales"].dtype == torch.float16 and t["g_idx"].shape == (128,)
    assert torch.equal(gptq_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits), qw.dequantize())


def test_gptq_layout_with_act_order_g_idx():
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 2, 128)
    s = LinearStats(torch.zeros(128, 128, dtype=torch.float64))
    s.add(x)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    grid = IntGrid(bits=4, group_size=32, symmetric=False, fp16_scales=True, min_zero=1)
    qw = gptq_quantize(w, s.gram, grid, GPTQConfig(act_order=True))
    t = gptq_tensors(qw)
    assert torch.equal(t["g_idx"], qw.g_idx.to(torch.int32)) and not torch.equal(t["g_idx"].sort().values, t["g_idx"])
    assert torch.equal(gptq_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4), qw.dequantize())


def test_zero_points_stay_storable_in_gptq_v1():
    w = torch.rand(8, 64) + 0.1  # all positive: a zero point of 0 would be natural, v1 cannot store it
    qw = RoundToNearest().quantize_weight(w, IntGrid(bits=4, group_size=32, symmetric=False, min_zero=1))
    assert qw.params.zero.min() >= 1
