"""Our compressed-tensors configs against the ones llm-compressor writes for the same schemes.

    python benchmarks/ct_config.py LLMCOMPRESSOR_PYTHON
    # writes benchmarks/results/ct_config.md

For each scheme (W4A16 group 128, W8A16 per channel, W8A8 int8, FP8 dynamic): llm-compressor's
``QuantizationModifier`` (round to nearest; it needs no calibration data for these) on the embedded model,
run with llm-compressor's own interpreter (it lives in its own virtual environment, see
../shared/docs/stack.md); ``quantkit ship --targets ct:SCHEME`` on the same model. The two
``quantization_config`` blocks and the tensor names and dtypes of one linear are compared key by key.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "quantkit" / "assets" / "default_model"
SCHEMES = {"w4a16": ("W4A16", ["--group-size", "128"]), "w8a16": ("W8A16", ["--bits", "8", "--group-size", "128"]),
           "w8a8": ("W8A8", []), "fp8": ("FP8_DYNAMIC", [])}
LINEAR = "model.layers.0.self_attn.q_proj"
PEER = """
import sys
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=sys.argv[2], ignore=["lm_head"]))
model.save_pretrained(sys.argv[3], save_compressed=True)
"""


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def tensors(folder: Path) -> dict[str, str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k.removeprefix(LINEAR + "."): f"{f.get_slice(k).get_dtype()}{f.get_slice(k).get_shape()}"
                for k in f.keys() if k.startswith(LINEAR + ".")}  # noqa: SIM118 - safe_open has no __iter__


def main() -> None:
    peer_python = sys.argv[1]
    work = Path(tempfile.mkdtemp(prefix="ct-config-"))
    lines = ["# compressed-tensors configs: quantkit vs llm-compressor", "",
             f"Command: `python benchmarks/ct_config.py {peer_python}` (llm-compressor in its own venv). Keys that "
             "differ are listed; `version` and `global_compression_ratio` are informational.", ""]
    for scheme, (peer_scheme, options) in SCHEMES.items():
        peer = work / f"peer-{scheme}"
        subprocess.run([peer_python, "-c", PEER, str(MODEL), peer_scheme, str(peer)], check=True,
                       capture_output=True)
        ours_out = work / f"ours-{scheme}"
        subprocess.run([sys.executable, "-m", "quantkit.cli", "ship", "--targets", f"ct:{scheme}", *options,
                        "--no-verify", "--out", str(ours_out), "--quiet"], check=True, capture_output=True)
        ours = ours_out / f"ct-{scheme}"
        theirs_cfg = flatten(json.loads((peer / "config.json").read_text())["quantization_config"])
        ours_cfg = flatten(json.loads((ours / "config.json").read_text())["quantization_config"])
        differing = sorted(k for k in theirs_cfg.keys() | ours_cfg.keys() if theirs_cfg.get(k) != ours_cfg.get(k))
        lines += [f"## {scheme} (llm-compressor scheme {peer_scheme})", "",
                  f"- tensors of `{LINEAR}`: quantkit {tensors(ours)}; llm-compressor {tensors(peer)}",
                  f"- config keys compared: {len(theirs_cfg.keys() | ours_cfg.keys())}; differing: {len(differing)}"]
        lines += [f"  - `{k}`: quantkit {ours_cfg.get(k, '(absent)')!r}, llm-compressor "
                  f"{theirs_cfg.get(k, '(absent)')!r}" for k in differing]
        lines.append("")
    out = ROOT / "benchmarks" / "results" / "ct_config.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
