"""tflite: LiteRT files run by LiteRT's own interpreter (ai-edge-litert), holding quantkit's weights: read back from
the flatbuffer they equal round-to-nearest on the target's grid computed here, the fp32 file computes transformers'
logits, and the quantized files pass the accuracy gate in LiteRT."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import quantkit
from quantkit.errors import QuantkitError
from quantkit.methods.rtn import RoundToNearest
from quantkit.model import ModelSource
from quantkit.targets.registry import parse_target
from quantkit.targets.tflite import MODEL_FILE, fully_connected_weights, litert_grid, load_runner
from quantkit_testing.helpers import runner_and_transformers_greedy
from quantkit_testing.runtimes import require, require_installed

require_installed("litert_torch")  # converts (in a child process of the export)
require("ai_edge_litert")  # runs

SEQ = 64


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite")
    return quantkit.ship(targets=["tflite", "tflite:8da8w", "tflite:fp32"], out=out, group_size=32, eval_samples=2,
                         seq_len=SEQ)


def artifact(result, target: str):
    return next(a for a in result.artifacts if a.target == target)


def test_every_file_runs_in_litert_and_passes_its_gate(shipped):
    for art in shipped.artifacts:
        assert art.runtime["name"].startswith("LiteRT interpreter") and art.runtime["version"]["ai-edge-litert"]
        assert art.verdict == "accepted", (art.target, art.failures)
        assert (shipped.out_dir / art.path / MODEL_FILE).is_file()
        assert (shipped.out_dir / art.path / "tokenizer.json").is_file()
    # the conversion ran in a child process: JAX (imported by litert-torch) would make later forks here unsafe
    assert "jax" not in sys.modules
    kld = {a.target: a.metrics["kld"] for a in shipped.artifacts}
    assert kld["tflite:fp32"] < 1e-5 < kld["tflite:8da8w"] < kld["tflite:8da4w"], kld


@pytest.mark.parametrize("target, bits, group_size", [("tflite:8da4w", 4, 32), ("tflite:8da8w", 8, -1)])
def test_the_file_holds_the_grid_s_weights(shipped, target, bits, group_size):
    """Each block linear's integer weights, decoded from the file's codes and scales, equal round-to-nearest of the
    checkpoint's weight on the target's grid (int4 blocks with fp16 scales; int8 per channel in [-127, 127])."""
    source = ModelSource()
    grid = litert_grid(bits, group_size)
    path = shipped.out_dir / artifact(shipped, target).path / MODEL_FILE
    stored = [w["decoded"] for w in fully_connected_weights(path) if "decoded" in w]
    names = [n for i in range(source.n_layers) for n in source.arch.linear_weights(i)]
    assert len(stored) == len(names)
    unmatched = list(range(len(stored)))
    for name in names:
        qw = RoundToNearest().quantize_weight(source.load(name), grid)
        assert qw.codes.min() >= grid.qmin and qw.codes.max() <= grid.qmax
        expected = qw.dequantize().numpy()
        hit = next((i for i in unmatched if stored[i].shape == expected.shape and np.array_equal(stored[i], expected)),
                   None)
        assert hit is not None, f"{name}: no FULLY_CONNECTED weight in the file equals the grid's"
        unmatched.remove(hit)


def test_fp32_file_computes_transformers_logits(shipped):
    runner, length = load_runner(shipped.out_dir / artifact(shipped, "tflite:fp32").path)
    ids = torch.randint(0, 4096, (1, length), generator=torch.Generator().manual_seed(0))
    ours = next(iter(runner(args_0=ids.numpy().astype(np.int32)).values()))[0]
    with torch.no_grad():
        reference = ModelSource().hf_model()(input_ids=ids).logits[0].numpy()
    # same fp32 weights; LiteRT's kernels sum in another order (seen: 5e-6 on logits of magnitude ~10)
    assert np.abs(ours - reference).max() < 1e-3 and length == SEQ


@pytest.mark.parametrize("options, message", [
    (dict(scheme="asym"), "symmetric weights only"),
    (dict(group_size=16), "blocks of 32, 64, 128, 256"),
])
def test_impossible_options_fail_before_any_work(tmp_path, options, message):
    out = tmp_path / "o"
    with pytest.raises(QuantkitError, match=message):
        quantkit.ship(targets=["tflite"], out=out, verbose=False, **options)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unknown_option_is_refused():
    with pytest.raises(QuantkitError, match="8da4w, 8da8w, fp32"):
        parse_target("tflite:w3")


def test_bench_runner_decodes_transformers_greedy_tokens(shipped):
    """quantkit bench's LiteRT runner over the fp32 file: a prompt, then one token per full-sequence run (padded to
    the file's length); the tokens equal transformers' greedy generation from the same prompt."""
    from quantkit.bench.runners import LiteRTRunner, runtime_for

    folder = shipped.out_dir / artifact(shipped, "tflite:fp32").path
    assert runtime_for(folder) == "litert"
    runner = LiteRTRunner(folder, threads=1, n_ctx=33)
    generated, expected = runner_and_transformers_greedy(runner, list(range(40, 56)), 16)
    assert generated == expected
    with pytest.raises(Exception, match=f"exactly {SEQ} tokens"):
        LiteRTRunner(folder, threads=1, n_ctx=SEQ + 8)


def test_another_family_converts_and_passes(tiny_models, tmp_path):
    """Qwen2 (linear biases): every block linear stored as integers (the export checks the count) and LiteRT's logits
    close to the unquantized model's. The gate is KL divergence alone: random tiny models have near-flat logits,
    whose top-1 flips under int8 activations (seen 0.86-0.92 at KLD < 0.002). (Phi-3's fused linears, Gemma 2 and
    Qwen3 were converted by hand the same way; kept out of the suite for time.)"""
    result = quantkit.ship(tiny_models["qwen2"], targets=["tflite:8da8w"], out=tmp_path / "o", eval_samples=2,
                           seq_len=SEQ, verbose=False, max_kld=0.01, max_ppl_increase_pct=1e9, min_top1=0.0)
    assert result.artifacts[0].verdict == "accepted", result.artifacts[0].failures


def test_quantized_embedding_is_one_int8_table_the_tied_head_reads(tiny_models, tmp_path):
    """--quantize-embeddings on a tied model: the file's EMBEDDING_LOOKUP table is int8 and decodes to round-to-nearest
    of the checkpoint's embedding on the int8 row grid; the output linear is an integer linear too (it reads the same
    table: the file is smaller than the table twice); LiteRT's logits stay close to the unquantized model's."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    from quantkit.targets.tflite import EMBEDDING_GRID

    result = quantkit.ship(tiny_models["llama-tied"], targets=["tflite:8da8w"], out=tmp_path / "o", eval_samples=2,
                           seq_len=SEQ, verbose=False, quantize_embeddings=True, max_kld=0.02,
                           max_ppl_increase_pct=1e9, min_top1=0.0)
    art = result.artifacts[0]
    assert art.verdict == "accepted", art.failures
    path = result.out_dir / art.path / MODEL_FILE
    source = ModelSource(tiny_models["llama-tied"])
    table = source.load(source.arch.embedding)
    expected = RoundToNearest().quantize_weight(table, EMBEDDING_GRID).dequantize().numpy()
    model = fb.read_model(str(path))
    graph = model.subgraphs[0]
    lookups = [op for op in graph.operators if model.operatorCodes[op.opcodeIndex].builtinCode == 7]  # EMBEDDING_LOOKUP
    weight = graph.tensors[lookups[0].inputs[1]]
    codes = np.frombuffer(bytes(model.buffers[weight.buffer].data), dtype=np.int8).reshape(expected.shape)
    decoded = codes.astype(np.float32) * np.asarray(weight.quantization.scale, dtype=np.float32)[:, None]
    assert np.array_equal(decoded, expected)
    head = [w for w in fully_connected_weights(path) if "decoded" in w and w["decoded"].shape == expected.shape]
    assert len(head) == 1 and np.array_equal(head[0]["decoded"], expected)
    heads = [op for op in graph.operators if model.operatorCodes[op.opcodeIndex].builtinCode == 9  # FULLY_CONNECTED
             and tuple(graph.tensors[op.inputs[1]].shape) == expected.shape]
    assert [graph.tensors[op.inputs[1]].buffer for op in heads] == [weight.buffer]  # one table in the file
