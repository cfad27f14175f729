"""compressed-tensors folders (ct:w4a16 / w8a16 / w8a8 / fp8): transformers loads each through the
compressed-tensors package, whose own decompression must give back exactly quantkit's dequantized weights,
and the artifact passes its accuracy gate in that runtime."""

import json

import pytest
import torch

import quantkit
from quantkit.errors import QuantkitError
from quantkit.model import ModelSource
from quantkit.recipe import Recipe, quantized_tensor_names
from quantkit.targets.base import ExportContext
from quantkit.targets.registry import parse_target
from quantkit_testing.runtimes import require

require("compressed_tensors")

LAYER = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    out = tmp_path_factory.mktemp("ct") / "o"
    return quantkit.ship(None, targets=["ct:w4a16", "ct:w8a8", "ct:fp8"], out=out, group_size=64, eval_samples=2,
                         seq_len=128, progress=False)


def decompressed(folder, name: str) -> torch.Tensor:
    """The weight as transformers + compressed-tensors decompress it (its own unpacking and scaling)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    return model.get_parameter(name).detach().float()


def test_every_scheme_loads_and_passes_its_gate(shipped):
    assert shipped.ok, [a.failures for a in shipped.artifacts]
    for art in shipped.artifacts:
        assert art.runtime["name"].startswith("transformers + compressed-tensors")
        bound = 0.02 if art.bits_per_weight >= 8 else 0.2  # embedded model: 8-bit ~1e-3, 4-bit g64 RTN ~0.05
        assert art.metrics["kld"] < bound, (art.target, art.metrics)
        config = json.loads((shipped.out_dir / art.path / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"


@pytest.mark.parametrize("scheme", ["w4a16", "w8a8", "fp8"])
def test_compressed_tensors_decompresses_exactly_quantkits_weights(shipped, scheme):
    source = ModelSource(None)
    recipe = Recipe(group_size=64)
    target = parse_target(f"ct:{scheme}")
    ctx = ExportContext(source, recipe, quantized_tensor_names(source, recipe), progress=False)
    ours = ctx.quantize(LAYER, target.grid(recipe)).dequantize()
    folder = shipped.out_dir / f"ct-{scheme}"
    theirs = decompressed(folder, LAYER)
    # scales are stored in the checkpoint's 16-bit type: the only rounding between the two
    assert torch.allclose(theirs, ours, rtol=1e-2, atol=1e-6), (theirs - ours).abs().max()
    assert not torch.allclose(theirs, source.load(LAYER), atol=1e-6)  # it is quantized


def test_asymmetric_w4a16_zero_points_decode(tmp_path):
    result = quantkit.ship(None, targets=["ct:w4a16"], out=tmp_path / "o", scheme="asym", group_size=32,
                           eval_samples=2, seq_len=64, progress=False)
    assert result.ok and result.artifacts[0].metrics["kld"] < 0.2
    config = json.loads((result.out_dir / "ct-w4a16" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is False


@pytest.mark.parametrize("options, message", [
    (dict(targets=["ct:w4a16"], bits=8), "pass --bits 4"),
    (dict(targets=["ct:fp8"], method="gptq"), "use --method rtn"),
    (dict(targets=["ct:w2"]), "unknown ct scheme"),
])
def test_impossible_combinations_fail_before_any_work(tmp_path, options, message):
    with pytest.raises(QuantkitError, match=message):
        quantkit.ship(None, out=tmp_path / "o", **options)
    assert not (tmp_path / "o").exists()
