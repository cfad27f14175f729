"""Model families: one module per family, each listing its ``Architecture`` entries in ``FAMILIES``.

Adding a family is one module here plus one line in ``_MODULES``; the pipeline, methods and targets read
only the ``Architecture`` data (``quantkit/arch/base.py``).
"""

from __future__ import annotations

from quantkit.arch import gemma, llama, mixtral, phi3, qwen2, qwen3, qwen3_moe
from quantkit.arch.base import LAYERS_70B, LLAMA_GGUF_NAMES, LLAMA_LINEARS, Architecture, Experts, FoldPoint

_MODULES = (llama, qwen2, qwen3, phi3, gemma, mixtral, qwen3_moe)
ARCHITECTURES: dict[str, Architecture] = {a.hf_class: a for module in _MODULES for a in module.FAMILIES}


def supported_names() -> str:
    return ", ".join(sorted(ARCHITECTURES))


__all__ = ["ARCHITECTURES", "LAYERS_70B", "LLAMA_GGUF_NAMES", "LLAMA_LINEARS", "Architecture", "Experts", "FoldPoint",
           "supported_names"]
