"""Method registry: one entry per quantization method."""

from quantkit.methods.base import Method
from quantkit.methods.rtn import RoundToNearest

METHODS: dict[str, type[Method]] = {RoundToNearest.name: RoundToNearest}

__all__ = ["METHODS", "Method", "RoundToNearest"]
