"""GGUF legacy block types: byte layout and rounding, checked against the gguf package's codecs.

The byte-for-byte check against llama.cpp's own quantizer is in test_gguf_llama.py; this file
checks the layouts without llama.cpp, so a packing error points here first.
"""

import gguf
import numpy as np
import pytest
import torch

from quantkit.grids import GGUF_GRIDS
from quantkit.methods import RoundToNearest

TYPES = sorted(GGUF_GRIDS)


def _weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 512, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block (scale 0)
    w[1, :32] = 0.25  # a constant block
    w[2, 5] = -0.9  # a block whose largest magnitude is negative
    return w


@pytest.mark.parametrize("name", TYPES)
def test_bytes_decode_in_gguf_to_our_values(name):
    grid = GGUF_GRIDS[name]
    qw = RoundToNearest().quantize_weight(_weights(1), grid)
    raw = grid.to_bytes(qw)
    assert raw.shape == (16, 512 // grid.group_size * grid.block_bytes)
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    np.testing.assert_array_equal(theirs, qw.dequantize().numpy())


# gguf-py cannot quantize k-quants or i-quants
@pytest.mark.parametrize("name", [t for t in TYPES if not t.endswith("_K") and not t.startswith("IQ")])
def test_bytes_equal_gguf_reference_quantizer(name):
    """gguf-py's numpy port of ggml's reference quantizer produces the same bytes."""
    w = _weights(2)
    ours = GGUF_GRIDS[name].to_bytes(RoundToNearest().quantize_weight(w, GGUF_GRIDS[name]))
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[name])
    np.testing.assert_array_equal(ours, theirs)


def test_q4_0_block_by_hand():
    # block: w[0] = -0.8 is the signed max -> d = -0.8 / -8 = 0.1; code = trunc(w / d + 8.5)
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 16] = -0.8, 0.34, 0.7
    qw = RoundToNearest().quantize_weight(w, GGUF_GRIDS["Q4_0"])
    assert qw.codes[0, :2].tolist() == [0, 11] and qw.codes[0, 16].item() == 15
    raw = GGUF_GRIDS["Q4_0"].to_bytes(qw)[0]
    assert raw[:2].view("<f2")[0] == np.float16(0.1)
    assert raw[2] == 0 | (15 << 4)  # byte 0 packs code[0] (low nibble) and code[16] (high nibble)
    assert raw[3] == 11 | (8 << 4)


def test_bits_per_weight():
    assert {n: g.bits_per_weight() for n, g in GGUF_GRIDS.items()} == {
        "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0,
        "Q6_K": 6.5625, "Q5_K": 5.5, "Q4_K": 4.5, "Q3_K": 3.4375, "Q2_K": 2.625, "IQ4_NL": 4.5, "IQ4_XS": 4.25}
