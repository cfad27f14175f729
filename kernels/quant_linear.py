"""``QuantLinear``: a linear layer holding packed 4-bit weights, and a loader that builds a
transformers model from an hf-gptq / hf-awq folder with QuantLinear layers in place.

Forward dispatches to the Triton W4A16 kernel for CUDA inputs and to the plain-torch reference on
CPU (``backend`` forces one; tests run the Triton path on CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.kernels import reference
from quantkit.packing import module_layout

BACKENDS = ("auto", "triton", "torch")
PACKED = ("qweight", "qzeros", "scales", "g_idx")


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, layout: str, group_size: int,
                 tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None, backend: str = "auto",
                 bits: int = 4):
        super().__init__()
        self.bits = bits
        if layout not in reference.LAYOUTS or backend not in BACKENDS:
            raise ValueError(f"layout must be one of {reference.LAYOUTS} and backend one of {BACKENDS}")
        self.in_features, self.out_features = in_features, out_features
        self.layout, self.group_size, self.backend = layout, group_size, backend
        for name in ("qweight", "qzeros", "scales"):
            self.register_buffer(name, tensors[name])
        g_idx = tensors.get("g_idx")
        if layout == "gptq" and g_idx is None:
            g_idx = (torch.arange(in_features) // group_size).to(torch.int32)
        self.register_buffer("g_idx", None if g_idx is None else g_idx.to(torch.int32))
        self.register_buffer("bias", bias)

    def _use_triton(self, x: torch.Tensor) -> bool:
        return self.backend == "triton" or (self.backend == "auto" and x.is_cuda)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return reference.dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.layout,
                                    self.group_size, dtype, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_triton(x):
            from quantkit.kernels.w4a16 import w4a16_matmul

            y = w4a16_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.layout, self.group_size,
                             bits=self.bits)
        else:
            y = reference.w4a16_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.layout,
                                       self.group_size, self.bits)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                f"bits={self.bits}, group_size={self.group_size}, backend={self.backend}")


def load_quantized_model(folder: str | Path, dtype: torch.dtype = torch.float32, backend: str = "auto"):
    """A transformers model from an hf-gptq / hf-awq folder, its quantized linears as QuantLinear."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    quant = raw.get("quantization_config") or {}
    layout = {"gptq": "gptq", "awq": "awq"}.get(quant.get("quant_method"))
    if layout is None or quant.get("bits") not in ((2, 4, 8) if layout == "gptq" else (4,)):
        raise QuantkitError(f"{folder} is not a 2/4/8-bit GPTQ or 4-bit AWQ checkpoint; quantkit's runtime reads "
                            "only those")
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    modules = dict(model.named_modules())
    plain = {}
    for name in sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith(".qweight")}):
        linear = modules.get(name)
        if linear is None:
            raise QuantkitError(f"{folder.name}: quantkit's runtime has no module {name} in {config.model_type}'s "
                                "transformers model (mixture-of-experts experts are not supported by it yet); "
                                "check it with --runtime transformers")
        packed = {key: tensors[f"{name}.{key}"] for key in PACKED if f"{name}.{key}" in tensors}
        bias = tensors.get(f"{name}.bias")
        bits, group_size = module_layout(quant, name) if layout == "gptq" else (quant["bits"], quant["group_size"])
        group_size = group_size if group_size > 0 else linear.in_features
        quant_linear = QuantLinear(linear.in_features, linear.out_features, layout, group_size, packed,
                                   None if bias is None else bias.to(dtype), backend, bits)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, quant_linear)
    for name, tensor in tensors.items():
        if not name.endswith(tuple(f".{key}" for key in PACKED)) and not _is_packed_bias(name, tensors):
            plain[name] = tensor.to(dtype)
    missing, _ = model.load_state_dict(plain, strict=False)
    absent = [m for m in missing if not m.endswith(tuple(PACKED)) and "bias" not in m.rsplit(".", 1)[-1]]
    if model.config.tie_word_embeddings:
        absent = [m for m in absent if m != "lm_head.weight"]
    if absent:
        raise QuantkitError(f"{folder} lacks {absent[0]} (and {len(absent) - 1} more); the checkpoint is incomplete")
    model.tie_weights()
    return model.eval()


def _is_packed_bias(name: str, tensors: dict) -> bool:
    return name.endswith(".bias") and f"{name[: -len('.bias')]}.qweight" in tensors
