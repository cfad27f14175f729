"""quantkit: quantize language models and ship them to runtimes, checked for accuracy in each."""

from __future__ import annotations

__version__ = "0.1.0"

# The public names load on first use: ``import quantkit`` (and light modules such as the benchmark runner
# that a child process imports) must not pay for torch.
_EXPORTS = {
    "ship": "quantkit.api",
    "build": "quantkit.builder",
    "plan": "quantkit.builder",
    "load_recipe": "quantkit.builder",
    "BuildResult": "quantkit.builder",
    "CellResult": "quantkit.builder",
    "RecipeError": "quantkit.builder",
    "GateFailure": "quantkit.errors",
    "QuantkitError": "quantkit.errors",
    "ArtifactResult": "quantkit.pipeline",
    "ShipResult": "quantkit.pipeline",
    "Recipe": "quantkit.recipe",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


__all__ = ["ArtifactResult", "BuildResult", "CellResult", "GateFailure", "QuantkitError", "Recipe", "RecipeError",
           "ShipResult", "__version__", "build", "load_recipe", "plan", "ship"]
