"""Target registry: one module per artifact format."""

from __future__ import annotations

from quantkit.errors import QuantkitError
from quantkit.targets.base import ExportContext, Target
from quantkit.targets.ct import CompressedTensorsTarget
from quantkit.targets.executorch import ExecuTorchTarget
from quantkit.targets.gguf import GGUFTarget
from quantkit.targets.hf_awq import HFAWQTarget
from quantkit.targets.hf_gptq import HFGPTQTarget
from quantkit.targets.onnx import ONNXTarget
from quantkit.targets.onnx_genai import OnnxGenaiTarget
from quantkit.targets.ort import ORTTarget
from quantkit.targets.tflite import TFLiteTarget

TARGETS: dict[str, type[Target]] = {t.kind: t for t in (GGUFTarget, HFGPTQTarget, HFAWQTarget, ONNXTarget, ORTTarget,
                                                        OnnxGenaiTarget, ExecuTorchTarget, TFLiteTarget,
                                                        CompressedTensorsTarget)}


def parse_target(spec: str) -> Target:
    """``kind[:option]``, e.g. ``gguf:Q4_0``."""
    kind, _, option = spec.strip().partition(":")
    if kind not in TARGETS:
        raise QuantkitError(f"unknown target {kind!r} in {spec!r}; available: {', '.join(sorted(TARGETS))}")
    return TARGETS[kind](option or None)


__all__ = ["TARGETS", "ExportContext", "Target", "parse_target"]
