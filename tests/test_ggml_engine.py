"""ggml's C quantizer as quantkit's GGUF engine: its parameters and codes, read back from its blocks,
equal the torch reference grids' (which reproduce ggml step for step), and the blocks round-trip."""

import numpy as np
import pytest
import torch

from quantkit.grids import GGUF_GRIDS, QuantizedWeight
from quantkit.grids.ggml_lib import engine, quantize_rows, use_engine
from quantkit.model import ModelSource
from quantkit_testing.ggml_reference import ggml_dequantize
from quantkit_testing.helpers import edge_weights

ROUNDED = [name for name, grid in GGUF_GRIDS.items() if grid.costly_search(torch.ones(1))]


def _weights() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Degenerate rows, and a trained matrix of the embedded model with a made-up importance."""
    source = ModelSource()
    trained = source.load("model.layers.1.mlp.up_proj.weight")[:64]
    return [edge_weights(), (trained, torch.linspace(0.1, 3.0, trained.shape[1]))]


def _assert_same_params(ours, theirs, label: str) -> None:
    for field, a, b in zip(("scale", "zero", "minimum", "inv_scale"), ours._tensors(), theirs._tensors(),
                           strict=True):
        assert (a is None) == (b is None), (label, field)
        if a is not None:
            assert torch.equal(a, b.expand_as(a)), (label, field)
    assert len(ours.aux) == len(theirs.aux), label
    for i, (a, b) in enumerate(zip(ours.aux, theirs.aux, strict=True)):
        assert a.shape == b.shape and torch.equal(a.float(), b.float()), (label, f"aux {i}")


def test_engine_is_ggml_where_llama_cpp_is_installed():
    assert engine() == "ggml"
    with use_engine("torch"):
        assert engine() == "torch"
    assert engine() == "ggml"


@pytest.mark.parametrize("gguf_type", sorted(GGUF_GRIDS))
@pytest.mark.parametrize("weighted", [False, True])
def test_ggml_fit_equals_torch_reference(gguf_type, weighted):
    """Whatever engine fits, GPTQ and AWQ see the same parameters and codes."""
    grid = GGUF_GRIDS[gguf_type]
    for i, (w, importance) in enumerate(_weights()):
        groups = w.reshape(w.shape[0], -1, grid.group_size)
        imp = importance.reshape(groups.shape[-2:]) if weighted else None
        reference = grid.reference_fit(groups, imp)
        fitted = grid.fit(groups, imp)
        _assert_same_params(fitted, reference, f"{gguf_type} weights {i}")
        if grid.costly_search(imp):  # fitted by ggml: its blocks decode, in ggml, to our decode of its codes
            raw = quantize_rows(gguf_type, w.numpy(), None if imp is None else importance.numpy())
            codes = grid.encode(groups, fitted).reshape(w.shape)
            decoded = QuantizedWeight(codes, fitted, grid).dequantize()
            np.testing.assert_array_equal(ggml_dequantize(gguf_type, raw, w.shape[1]), decoded.numpy())


@pytest.mark.parametrize("gguf_type", ROUNDED)
def test_blocks_read_back_and_written_again_are_ggml_bytes(gguf_type):
    grid = GGUF_GRIDS[gguf_type]
    w, importance = edge_weights()
    raw = quantize_rows(gguf_type, w.numpy(), importance.numpy())
    params = grid.params_from_blocks(raw.reshape(w.shape[0], -1, grid.block_bytes))
    codes = params.aux[-1].reshape(w.shape).to(torch.int32)
    assert np.array_equal(grid.to_bytes(QuantizedWeight(codes, params, grid)), raw)


@pytest.mark.parametrize("threads", [1, 2, 7])
def test_rows_split_over_threads_give_the_same_bytes(threads):
    w = torch.randn(300, 512, generator=torch.Generator().manual_seed(1))
    one_call = quantize_rows("Q4_K", w.numpy(), threads=1)
    assert np.array_equal(quantize_rows("Q4_K", w.numpy(), threads=threads), one_call)


def test_round_to_bytes_is_the_same_in_both_engines():
    w, importance = edge_weights()
    for name, grid in GGUF_GRIDS.items():
        for imp in (None, importance):
            fast = grid.round_to_bytes(w, imp)
            with use_engine("torch"):
                reference = grid.round_to_bytes(w, imp)
            assert np.array_equal(fast, reference), (name, imp is None)


def test_rows_that_do_not_fit_the_blocks_never_reach_ggml():
    """ggml writes whole blocks per row: a 576-wide row would run past the output buffer."""
    with pytest.raises(ValueError, match="Q4_K needs rows that are a multiple of 256; got rows of 576"):
        quantize_rows("Q4_K", np.zeros((4, 576), dtype=np.float32))
