"""llama.cpp's own Hugging Face -> GGUF converter, the reference for quantkit's GGUF metadata and tensors.

It is ``convert_hf_to_gguf.py`` with its ``conversion/`` package (one module per family) and its own gguf-py,
from the llama-cpp-python sdist of the version quantkit pins; scripts/install-test-deps.sh unpacks them into
``CONVERTER_DIR``. One deliberate change when run here: its BPE pre-tokenizer detection (a hash of how the
tokenizer splits a fixed text, from a list of known checkpoints) is answered with the pre-tokenizer name quantkit
writes, since the tiny test checkpoints carry quantkit's embedded tokenizer, which no published model uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

LLAMA_CPP_PYTHON = version("llama-cpp-python")  # the installed (pinned) one: its sdist carries the converter
CONVERTER_DIR = Path(os.environ.get("QUANTKIT_LLAMA_CONVERTER",
                                    Path.home() / ".cache" / "quantkit" / f"llama.cpp-converter-{LLAMA_CPP_PYTHON}"))
FETCH = "scripts/install-test-deps.sh"

RUNNER = """
import runpy, sys
vendor, pre, *args = sys.argv[1:]
sys.path[:0] = [vendor, vendor + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [vendor + "/convert_hf_to_gguf.py", *args]
runpy.run_path(vendor + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def converter_dir() -> Path:
    if not (CONVERTER_DIR / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"llama.cpp's converter is not in {CONVERTER_DIR}; {FETCH} unpacks it from the "
                    f"llama-cpp-python {LLAMA_CPP_PYTHON} sdist")
    return CONVERTER_DIR


def convert(model_dir: Path, out: Path, pre: str, outtype: str = "f32") -> Path:
    """llama.cpp's F32 (or ``outtype``) GGUF of ``model_dir``, written by its own converter in a child."""
    vendor = converter_dir()
    done = subprocess.run([sys.executable, "-c", RUNNER, str(vendor), pre, str(model_dir), "--outtype", outtype,
                           "--outfile", str(out)], capture_output=True, text=True, cwd=out.parent)
    if done.returncode != 0:
        raise AssertionError(f"llama.cpp's converter failed on {model_dir.name}:\n{done.stderr[-3000:]}")
    return out
