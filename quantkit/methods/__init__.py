"""Method registry: one entry per quantization method."""

from quantkit.methods.awq import AWQ, AWQConfig
from quantkit.methods.base import Method
from quantkit.methods.gptq import GPTQ, GPTQConfig
from quantkit.methods.rtn import RoundToNearest

METHODS: dict[str, type[Method]] = {m.name: m for m in (RoundToNearest, GPTQ, AWQ)}

__all__ = ["AWQ", "AWQConfig", "GPTQ", "METHODS", "GPTQConfig", "Method", "RoundToNearest"]
