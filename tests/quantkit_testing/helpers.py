"""Helpers shared by test modules."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from quantkit.calibrate import LinearStats
from quantkit.model import ModelSource
from quantkit.packing import awq_dequantize, gptq_dequantize
from quantkit.recipe import Recipe, quantized_tensor_names
from quantkit.targets.base import ExportContext
from quantkit.targets.registry import parse_target


def decoded_reference(folder, kind: str):
    """The source model in fp32 carrying the folder's tensors, quantized ones decoded by quantkit.packing."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    stored = {}
    for file in sorted(folder.glob("*.safetensors")):
        stored.update(load_file(file))
    model = ModelSource().hf_model()
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in stored.items():
            if name.endswith(".qweight"):
                prefix = name.removesuffix(".qweight")
                if kind == "hf-gptq":
                    # each module's width from its own tensors (32 * qweight rows / inputs), not from the config:
                    # a budgeted folder gives modules their own bits
                    g_idx = stored[f"{prefix}.g_idx"]
                    bits = 32 * tensor.shape[0] // g_idx.shape[0]
                    w = gptq_dequantize(tensor, stored[f"{prefix}.qzeros"], stored[f"{prefix}.scales"], g_idx, bits)
                else:
                    w = awq_dequantize(tensor, stored[f"{prefix}.qzeros"], stored[f"{prefix}.scales"],
                                       config["group_size"])
                state[f"{prefix}.weight"].copy_(w)
            elif name in state:
                state[name].copy_(tensor.float())
    return model


def edge_weights() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with ggml's degenerate cases, and an importance with dead columns: (8, 512) and (512,)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 512, generator=g) * 0.05
    w[0, :256] = 0.0  # an all-zero super-block
    w[1, 16:32] = 0.0  # an all-zero 16-weight sub-block
    w[2, 32:64] = 0.0  # an all-zero 32-weight block
    w[3, :32] = 0.25  # a constant block
    w[4] = 0.0  # an all-zero row
    w[5, 7] = -1.5  # an outlier
    importance = torch.rand(512, generator=g)
    importance[100:140] = 0.0  # columns that never fired
    return w, importance


def runner_and_transformers_greedy(runner, prompt: list[int], n: int) -> tuple[list[int], list[int]]:
    """``n`` greedy tokens from a bench runner (prefill, then one step per token) and from transformers' generate on
    the embedded model, both after ``prompt``."""
    token, generated = runner.prefill(prompt), []
    for _ in range(n):
        generated.append(token)
        token = runner.step(token)
    with torch.no_grad():
        expected = ModelSource().hf_model().generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                                     do_sample=False)[0, len(prompt):].tolist()
    return generated, expected

def export(model_dir, gguf_type: str, path: Path, validate: bool = True, **recipe) -> Path:
    src = ModelSource(model_dir)
    r = Recipe(**recipe)
    ctx = ExportContext(src, r, quantized_tensor_names(src, r), progress=False)
    target = parse_target(f"gguf:{gguf_type}")
    if validate:
        target.validate(ctx)
    target.export(ctx, path)
    return path


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Activations with a few strong directions and uneven channel scales, like a real layer's."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, features, generator=g)
    x = torch.randn(tokens, 8, generator=g) @ basis + 0.3 * torch.randn(tokens, features, generator=g)
    return x * torch.linspace(0.2, 3.0, features)


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float(((x @ (w - wq).T) ** 2).mean())


def stats_of(x: torch.Tensor) -> LinearStats:
    s = LinearStats(torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64))
    s.add(x)
    return s


def gguf_field(path: Path, key: str):
    """One metadata value of a GGUF file, as gguf-py reads it."""
    import gguf

    return gguf.GGUFReader(path).fields[key].contents()
