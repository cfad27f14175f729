"""A checkout shadows nothing installed, and quantkit imports the same from any current directory.

A folder at the checkout root with an ``__init__.py`` becomes an importable top-level name whenever the root is
on sys.path (``python -m`` and ``python -c`` put the current directory first, and every child started there
inherits it): a top-level kernels/ package once hid Hugging Face's ``kernels``, which transformers imports at
start-up. quantkit's folders at the root carry no ``__init__.py`` but quantkit/ itself, so they never shadow.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import kernels, transformers, quantkit.kernels.reference, quantkit.targets.registry; "
         "print(kernels.__file__); print(quantkit.targets.registry.__file__)")


def importable_names_at_root() -> dict[str, Path]:
    """Top-level names the checkout root would provide as regular modules or packages."""
    names = {}
    for entry in ROOT.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names[entry.name] = entry
        elif entry.is_file() and entry.suffix == ".py":
            names[entry.stem] = entry
    return names


def test_no_folder_at_the_root_shadows_an_installed_distribution():
    provided = importlib.metadata.packages_distributions()
    names = importable_names_at_root()
    assert set(names) == {"quantkit"}, f"importable from the checkout root: {sorted(names)}"
    assert set(provided.get("quantkit", [])) == {"quantkit"}


def test_the_kernels_distribution_transformers_needs_is_installed():
    """The name the checkout once shadowed: the probe below is only meaningful while it is installed."""
    assert "kernels" in importlib.metadata.packages_distributions()


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_children_started_from_any_folder_import_the_installed_kernels(where, tmp_path):
    """A child as quantkit starts them, from the checkout root (which ``-c`` and ``-m`` both put first on
    sys.path) or any other folder: ``kernels`` is the installed distribution, and quantkit's targets load."""
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT if where == "root" else tmp_path,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    kernels_file, registry_file = (Path(line) for line in done.stdout.split())
    installed = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
    assert kernels_file.resolve() == installed.resolve(), f"kernels resolved to {kernels_file}, not {installed}"
    assert registry_file.name == "registry.py" and registry_file.parent.name == "targets"


def test_quantkit_runs_as_a_module_from_the_checkout_root():
    done = subprocess.run([sys.executable, "-m", "quantkit.cli", "--version"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and done.stdout.startswith("quantkit"), done.stderr[-2000:]


def test_the_shared_test_helpers_come_from_tests_not_the_root():
    import quantkit_testing

    assert Path(quantkit_testing.__file__).resolve().parent == ROOT / "tests" / "quantkit_testing"
