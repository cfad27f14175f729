"""ORT format (``.ort``) for onnxruntime's mobile and reduced builds.

The ONNX decoder of the ``onnx`` target, converted by onnxruntime's own tool
(``python -m onnxruntime.tools.convert_onnx_models_to_ort``) with fixed optimizations for ARM, the
platform phones run. The folder holds ``model.ort``, ``required_operators.config`` (pass it to
onnxruntime's ``build.sh --minimal_build --include_ops_by_config`` for a runtime with only these
kernels), ``config.json`` and the tokenizer. It is checked by loading ``model.ort`` in onnxruntime.
A flatbuffer cannot exceed 2 GiB, so larger models are refused up front.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.targets.base import ExportContext, ExportReport
from quantkit.targets.onnx import MODEL_FILE, ONNXTarget

ORT_FILE = "model.ort"
OPERATORS_CONFIG = "required_operators.config"
MAX_ORT_BYTES = 2 * 2**30  # flatbuffers' limit


class ORTTarget(ONNXTarget):
    kind = "ort"

    def validate(self, ctx: ExportContext) -> None:
        super().validate(ctx)
        grid = self.grid(ctx.recipe)
        estimate = sum(info.numel for name, info in ctx.source.tensors.items()) * 2  # fp16-sized upper bound
        quantized = sum(ctx.source.tensors[n].numel for n in ctx.quantized_names)
        estimate -= quantized * (2 - grid.bits / 8)
        if estimate > MAX_ORT_BYTES:
            raise QuantkitError(f"ort: the model needs about {estimate / 2**30:.1f} GiB, over the ORT format's 2 GiB "
                                "limit; use the onnx target (external data) for this model")

    def export(self, ctx: ExportContext, path: Path) -> ExportReport:
        path.mkdir()
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-") as scratch:
            onnx_dir = Path(scratch) / "onnx"
            report = super().export(ctx, onnx_dir)
            converted = Path(scratch) / "ort"
            _convert(onnx_dir / MODEL_FILE, converted)
            shutil.move(converted / ORT_FILE, path / ORT_FILE)
            configs = sorted(converted.glob("*.config"))
            if not configs:
                raise QuantkitError("onnxruntime's converter wrote no required-operators config; see its log above")
            _write_operators_config(configs[0], path / OPERATORS_CONFIG)
            for item in onnx_dir.iterdir():
                if item.suffix == ".json" or item.name == "tokenizer.model":
                    shutil.copy(item, path / item.name)
        return ExportReport((*report.notes, "reduced build: onnxruntime build.sh --minimal_build "
                             f"--include_ops_by_config {OPERATORS_CONFIG}"))

    def model_file(self, path: Path) -> Path:
        return path / ORT_FILE

    def runtime(self) -> dict:
        info = super().runtime()
        info["name"] = "onnxruntime, ORT format (CPUExecutionProvider)"
        return info



def _convert(model: Path, out_dir: Path) -> None:
    command = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(model), "--output_dir",
               str(out_dir), "--optimization_style", "Fixed", "--target_platform", "arm"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (out_dir / ORT_FILE).is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise QuantkitError(f"onnxruntime's ORT converter failed ({tail[0]}); check the onnxruntime install")


def _write_operators_config(written: Path, dest: Path) -> None:
    """The converter's config, naming the shipped file instead of the scratch path it converted."""
    lines = [f"# - {ORT_FILE}" if line.startswith("# - ") else line for line in written.read_text().splitlines()]
    dest.write_text("\n".join(lines) + "\n")
