"""quantkit: quantize language models and ship them to runtimes, checked for accuracy in each."""

__version__ = "0.1.0"

from quantkit.api import ship  # noqa: E402
from quantkit.errors import GateFailure, QuantkitError  # noqa: E402
from quantkit.pipeline import ArtifactResult, ShipResult  # noqa: E402
from quantkit.recipe import Recipe  # noqa: E402

__all__ = ["ArtifactResult", "GateFailure", "QuantkitError", "Recipe", "ShipResult", "__version__", "ship"]
