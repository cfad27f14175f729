"""The real runtimes the tests check artifacts in: a missing one fails the test run.

Every format quantkit writes is checked by the runtime that deploys it (llama.cpp, onnxruntime, the
ExecuTorch runtime, transformers + gptqmodel) and some tests compare with a reference library
(sentencepiece). CI installs all of them, and a missing one must fail there, never skip. For local work
on a machine without some of them, ``QUANTKIT_TESTS_ALLOW_MISSING_RUNTIMES=1`` turns the failure into a
skip that pytest reports as such.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

OPT_IN = "QUANTKIT_TESTS_ALLOW_MISSING_RUNTIMES"


def require(module: str) -> ModuleType:
    """Import ``module``; without it, fail (or skip the calling module under the opt-in variable)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get(OPT_IN) == "1":
            pytest.skip(f"{module} is not installed ({OPT_IN}=1)", allow_module_level=True)
        raise ImportError(f"{module} is required by the tests (pip install --require-hashes -r locks/all.txt, as "
                          f"README's first command does); set {OPT_IN}=1 to skip its tests locally") from exc


def require_installed(module: str) -> None:
    """Like ``require``, without importing ``module`` into the test process (for packages whose import has side
    effects there: litert-torch starts JAX's threads)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        require(module)  # fails (or skips) with the same message


def require_program(name: str, install: str) -> str:
    """The path of the system program ``name``; without it, fail (or skip under the opt-in variable)."""
    import shutil

    for candidate in (name, f"/usr/sbin/{name}"):
        found = shutil.which(candidate)
        if found:
            return found
    if os.environ.get(OPT_IN) == "1":
        pytest.skip(f"{name} is not installed ({OPT_IN}=1)")
    pytest.fail(f"{name} is required by this test ({install}); set {OPT_IN}=1 to skip it locally")
