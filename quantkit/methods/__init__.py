"""Method registry: one entry per quantization method."""

from quantkit.methods.base import Method
from quantkit.methods.gptq import GPTQ, GPTQConfig
from quantkit.methods.rtn import RoundToNearest

METHODS: dict[str, type[Method]] = {m.name: m for m in (RoundToNearest, GPTQ)}

__all__ = ["GPTQ", "METHODS", "GPTQConfig", "Method", "RoundToNearest"]
