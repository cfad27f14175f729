"""Loading checkpoint folders: architectures as data, lazy and sharded safetensors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.arch import ARCHITECTURES
from quantkit.errors import QuantkitError
from quantkit.model import ModelSource


@pytest.mark.parametrize("name,arch,tied", [("llama", "llama", False), ("llama-tied", "llama", True),
                                            ("mistral", "mistral", False), ("qwen2", "qwen2", False),
                                            ("qwen3", "qwen3", True), ("phi3", "phi3", False),
                                            ("gemma2", "gemma2", True), ("gemma3", "gemma3", True)])
def test_supported_architectures_load(tiny_models, name, arch, tied):
    src = ModelSource(tiny_models[name])
    assert src.arch.name == arch
    assert src.tied_embeddings is tied
    assert src.n_layers == 2
    for i in range(src.n_layers):
        for tensor in src.arch.linear_weights(i):
            assert tensor in src.tensors
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in src.tensors


def test_tensors_match_the_checkpoint(tiny_models):
    src = ModelSource(tiny_models["llama"])
    stored = load_file(tiny_models["llama"] / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(src.load(name), stored[name].float())
    assert src.parameter_count == sum(t.numel() for t in stored.values())


def test_sharded_checkpoint(tiny_llama):
    tensors = load_file(tiny_llama / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, tiny_llama / file)
        weight_map.update({n: file for n in part})
    (tiny_llama / "model.safetensors").unlink()
    (tiny_llama / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    src = ModelSource(tiny_llama)
    assert len(src.weight_files) == 2
    assert torch.equal(src.load(names[-1]), tensors[names[-1]].float())


def test_default_model_is_embedded():
    src = ModelSource()
    assert src.is_default and src.arch.name == "llama"
    cfg = src.config
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (256, 4, 4, 2, 768, 4096)
    # every matmul input dimension is a multiple of 256, so llama.cpp's k-quants fit every tensor
    for info in src.tensors.values():
        if len(info.shape) == 2:
            assert info.shape[1] % 256 == 0
    assert all(info.dtype == "BF16" for info in src.tensors.values())


def test_unsupported_architecture_lists_supported(tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError) as err:
        ModelSource(tiny_llama)
    assert "GPTNeoXForCausalLM" in str(err.value)
    for name in ARCHITECTURES:
        assert name in str(err.value)
