"""Helpers shared by test modules."""

import json

import torch
from safetensors.torch import load_file

from quantkit.model import ModelSource
from quantkit.packing import awq_dequantize, gptq_dequantize


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
                    w = gptq_dequantize(tensor, stored[f"{prefix}.qzeros"], stored[f"{prefix}.scales"],
                                        stored[f"{prefix}.g_idx"], config["bits"])
                else:
                    w = awq_dequantize(tensor, stored[f"{prefix}.qzeros"], stored[f"{prefix}.scales"],
                                       config["group_size"])
                state[f"{prefix}.weight"].copy_(w)
            elif name in state:
                state[name].copy_(tensor.float())
    return model
