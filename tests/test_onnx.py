"""onnx and ort targets: decoders run by onnxruntime carry quantkit's integers (MatMulNBits), match
torch with the same decoded weights, decode with the KV cache like torch, and are scored from
onnxruntime's logits."""

import json

import numpy as np
import pytest
import torch

import quantkit
from quantkit.errors import QuantkitError
from quantkit.grids import IntGrid
from quantkit.methods import RoundToNearest
from quantkit.model import ModelSource
from quantkit.onnx_decoder import OnnxDecoder, greedy_generate
from quantkit.recipe import Recipe, quantized_tensor_names
from quantkit.targets import onnx as onnx_target
from quantkit_testing.helpers import decoded_reference
from quantkit_testing.runtimes import require

require("onnxruntime")  # runs every onnx / ort artifact

# fp32 activations: onnxruntime and torch sum the same products in different orders (and ORT fuses
# the SiLU); 1e-4 relative to the largest logit is far below one quantization step's effect.
FP32_TOLERANCE = 1e-4


def rtn_model(folder, recipe: Recipe):
    """The checkpoint in torch with every quantized linear replaced by its round-to-nearest decode."""
    source = ModelSource(folder)
    model = source.hf_model()
    state = model.state_dict()
    with torch.no_grad():
        for name in quantized_tensor_names(source, recipe):
            state[name].copy_(RoundToNearest().quantize_weight(source.load(name), recipe.int_grid()).dequantize())
    return model


def ort_logits(folder, ids: torch.Tensor, model_file="model.onnx") -> torch.Tensor:
    logits, _ = OnnxDecoder(folder / model_file).forward(ids.numpy())
    return torch.from_numpy(logits.astype(np.float32))


def assert_close(theirs: torch.Tensor, ours: torch.Tensor, tolerance: float) -> None:
    scale = ours.abs().max().item()
    assert (theirs - ours).abs().max().item() < tolerance * scale


TINY_CASES = {
    "llama-sym-g32": ("llama", dict(bits=4, group_size=32, scheme="sym")),
    "llama-tied-asym-channel": ("llama-tied", dict(bits=4, group_size=-1, scheme="asym")),
    "mistral-8bit-g64": ("mistral", dict(bits=8, group_size=64, scheme="sym")),
    "qwen2-2bit-asym-g16": ("qwen2", dict(bits=2, group_size=16, scheme="asym")),
    "qwen3-qk-norms-g32": ("qwen3", dict(bits=4, group_size=32, scheme="asym")),
}


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_onnx_logits_equal_torch_with_the_same_integers(case, tiny_models, tmp_path):
    arch, grid = TINY_CASES[case]
    recipe = Recipe(**grid, eval_samples=1, seq_len=32)
    result = quantkit.ship(tiny_models[arch], targets=["onnx"], out=tmp_path / "o", max_ppl_increase_pct=1e9,
                           max_kld=1e9, min_top1=0.0, eval_samples=1, seq_len=32, **grid)
    folder = result.out_dir / result.artifacts[0].path
    ids = torch.randint(1, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = rtn_model(tiny_models[arch], recipe)(input_ids=ids).logits
    assert_close(ort_logits(folder, ids), ours, FP32_TOLERANCE)


@pytest.fixture(scope="module")
def gptq_pair(tmp_path_factory):
    """GPTQ with act-order on the embedded model, exported as hf-gptq and onnx from one pass."""
    out = tmp_path_factory.mktemp("gptq-onnx")
    return quantkit.ship(targets=["hf-gptq", "onnx"], out=out, method="gptq", act_order=True, runtime="quantkit",
                         eval_samples=2, calib_samples=8, seq_len=256)


def test_gptq_integers_reach_the_onnx_file(gptq_pair):
    """The same GPTQ weights in torch (decoded from the hf-gptq folder) and in onnxruntime."""
    folders = {a.target: gptq_pair.out_dir / a.path for a in gptq_pair.artifacts}
    ids = torch.randint(1, 4096, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = decoded_reference(folders["hf-gptq"], "hf-gptq")(input_ids=ids).logits
    assert_close(ort_logits(folders["onnx"], ids), ours, FP32_TOLERANCE)
    # act-order weights travel with a column permutation in front of MatMulNBits
    import onnx

    graph = onnx.load(str(folders["onnx"] / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 4 * 7 and ops.count("Gather") > 4 * 7


def test_greedy_generation_with_the_kv_cache_equals_torch(gptq_pair):
    folders = {a.target: gptq_pair.out_dir / a.path for a in gptq_pair.artifacts}
    model = decoded_reference(folders["hf-gptq"], "hf-gptq")
    tokenizer = ModelSource().tokenizer()
    prompt = tokenizer("def parse_arguments(argv):\n    parser = ")["input_ids"]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(32):  # full forward each step: the reference does not depend on a cache
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = ids[0, len(prompt):].tolist()
    assert greedy_generate(folders["onnx"] / "model.onnx", prompt, 32) == expected


def test_cached_steps_give_the_logits_of_a_full_pass(tiny_models, tmp_path):
    result = quantkit.ship(tiny_models["qwen2"], targets=["onnx"], out=tmp_path / "o", max_ppl_increase_pct=1e9,
                           max_kld=1e9, min_top1=0.0, eval_samples=1, seq_len=32)
    decoder = OnnxDecoder(result.out_dir / result.artifacts[0].path / "model.onnx")
    ids = np.random.default_rng(0).integers(1, 4096, (1, 20))
    full, _ = decoder.forward(ids)
    first, cache = decoder.forward(ids[:, :12])
    rest, cache = decoder.forward(ids[:, 12:], cache)
    assert cache[0].shape[2] == 20
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), full, rtol=0, atol=1e-4 * np.abs(full).max())


# fp16 activations: every matmul input and the residual stream are rounded to 11 significant bits, so logits
# drift by about 2^-11 times the accumulated magnitude over the layers; 1e-2 of the largest logit bounds it.
FP16_TOLERANCE = 1e-2


def test_ship_onnx_fp16_and_ort_are_scored_by_onnxruntime(tmp_path):
    result = quantkit.ship(targets=["onnx:fp16", "ort"], out=tmp_path / "o", eval_samples=2, seq_len=256)
    arts = {a.target: a for a in result.artifacts}
    assert set(arts) == {"onnx:fp16", "ort"}
    for art in arts.values():
        assert art.verdict == "accepted", art.failures
        assert art.runtime["version"]["onnxruntime"]
    # what onnxruntime computes from each file, against torch running the same round-to-nearest integers
    ids = torch.randint(1, 4096, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = rtn_model(None, Recipe())(input_ids=ids).logits
    assert_close(ort_logits(result.out_dir / arts["ort"].path, ids, "model.ort"), ours, FP32_TOLERANCE)
    assert_close(ort_logits(result.out_dir / arts["onnx:fp16"].path, ids), ours, FP16_TOLERANCE)
    ort_dir = result.out_dir / arts["ort"].path
    assert (ort_dir / "model.ort").is_file() and not (ort_dir / "model.onnx").exists()
    operators = (ort_dir / "required_operators.config").read_text()
    assert "MatMulNBits" in operators and "/tmp" not in operators
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert {a["target"] for a in manifest["artifacts"]} == {"onnx:fp16", "ort"}


def test_large_models_get_an_external_data_file(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_target, "EXTERNAL_DATA_BYTES", 0)
    result = quantkit.ship(tiny_models["llama"], targets=["onnx"], out=tmp_path / "o", max_ppl_increase_pct=1e9,
                           max_kld=1e9, min_top1=0.0, eval_samples=1, seq_len=32)
    folder = result.out_dir / result.artifacts[0].path
    assert (folder / "model.onnx.data").stat().st_size > (folder / "model.onnx").stat().st_size
    ids = torch.randint(1, 4096, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = rtn_model(tiny_models["llama"], Recipe())(input_ids=ids).logits
    assert_close(ort_logits(folder, ids), ours, FP32_TOLERANCE)


@pytest.mark.parametrize("recipe, message", [
    (dict(bits=3), "MatMulNBits runs 2, 4, 8-bit weights"),
    (dict(group_size=8), "power of two >= 16"),
    (dict(quantize_embeddings=True), "drop --quantize-embeddings"),
])
def test_impossible_grids_are_refused_before_work(recipe, message, tmp_path):
    with pytest.raises(QuantkitError, match=message):
        quantkit.ship(targets=["onnx"], out=tmp_path / "o", **recipe)
    assert not (tmp_path / "o").exists()


def test_unknown_option_is_refused():
    with pytest.raises(QuantkitError, match="onnx:fp32 or onnx:fp16"):
        quantkit.ship(targets=["onnx:int3"], out="unused")


def test_grid_is_the_checkpoint_grid():
    assert onnx_target.ONNXTarget(None).grid(Recipe(bits=8)) == IntGrid(bits=8, group_size=128, symmetric=True,
                                                                         fp16_scales=True, min_zero=1)


def test_inspect_shows_the_matmul_nbits_weights(gptq_pair, capsys):
    from quantkit.cli import main

    folder = next(gptq_pair.out_dir / a.path for a in gptq_pair.artifacts if a.target == "onnx")
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "onnx" and info["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert info["matmul_nbits"]["count"] == 28 and info["matmul_nbits"]["bits"] == [4]
    assert info["matmul_nbits"]["block_sizes"] == [128] and info["operators"]["Gather"] > 28
