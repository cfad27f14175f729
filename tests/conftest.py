"""Shared fixtures: tiny random checkpoints of each supported architecture, saved as HF folders.

They reuse the embedded model's tokenizer so GGUF export (which needs a real tokenizer) works.
Random weights say nothing about accuracy; accuracy tests use the embedded trained model.
"""

from __future__ import annotations

import os

# Triton kernels run under Triton's interpreter on CPU tensors (no GPU in CI). Must be set before
# any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil
from pathlib import Path

import pytest

from quantkit_testing.models import TINY_CONFIGS, save_tiny


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    # llama.cpp keys some token attributes on the model's name: a name with "phi3" in it makes it look up
    # Phi-3's own special tokens ("</s>", "<s>", "<unk>"), which the embedded tokenizer lacks
    return {name: save_tiny(root / name.replace("phi3", "phi-mini"), make()) for name, make in TINY_CONFIGS.items()}


@pytest.fixture
def tiny_llama(tiny_models, tmp_path) -> Path:
    """A private copy of the tiny Llama that a test may damage."""
    dest = tmp_path / "tiny-llama"
    shutil.copytree(tiny_models["llama"], dest)
    return dest


@pytest.fixture(scope="session")
def default_ship(tmp_path_factory):
    """The embedded model shipped once to every registered target with no option and every recipe default
    (--seq-len 512 included), only the evaluation cut to one row: the tests of defaults share it."""
    import quantkit
    from quantkit.targets.registry import TARGETS

    return quantkit.ship(targets=list(TARGETS), out=tmp_path_factory.mktemp("defaults") / "out", eval_samples=1)
