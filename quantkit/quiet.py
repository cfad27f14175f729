"""Keep third-party libraries' warnings, log lines and banners out of normal runs (``--verbose`` shows them).

Our own warnings (those raised from quantkit's files, or of quantkit's warning classes) stay visible.
Runtimes that print from native code (ExecuTorch's cpuinfo probe) or from their own loggers at load time
(gptqmodel's banner) run inside ``silenced()``, which points the process's stdout and stderr at a scratch
file for the duration; our progress bars never run inside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # holds quantkit/, targets/ and kernels/ in a checkout
OWN_FOLDERS = tuple(str(PACKAGE_ROOT / name) for name in ("quantkit", "targets", "kernels"))
# Loggers of the libraries quantkit drives; raised to ERROR while quiet.
THIRD_PARTY_LOGGERS = ("torch", "torchao", "transformers", "executorch", "gptqmodel", "optimum", "onnxruntime",
                       "onnx", "onnxscript", "triton", "accelerate", "huggingface_hub", "gguf", "root")
_quiet = False  # inside third_party_quiet(enabled=True)


def _ours(category: type[Warning], filename: str) -> bool:
    import quantkit

    own_root = str(Path(quantkit.__file__).resolve().parent.parent)
    return category.__module__.startswith("quantkit") or str(Path(filename).resolve()).startswith(
        (*OWN_FOLDERS, own_root + "/quantkit", own_root + "/targets", own_root + "/kernels"))


@contextlib.contextmanager
def third_party_quiet(enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    global _quiet
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if _ours(category, filename):
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        previous, _quiet = _quiet, True
        try:
            yield
        finally:
            _quiet = previous
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """While quiet, send everything written to file descriptors 1 and 2 (Python or native) to a scratch
    file, dropped afterwards; outside quiet runs (``--verbose``) do nothing."""
    if not _quiet:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    # Python-level streams too: where sys.stdout is not descriptor 1 (a notebook, pytest's capture, a caller's
    # redirect_stdout), a library's print() would otherwise land in the caller's output (--json's stdout)
    with tempfile.TemporaryFile() as sink, open(os.devnull, "w") as python_sink, \
            contextlib.redirect_stdout(python_sink), contextlib.redirect_stderr(python_sink):
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(ValueError, OSError):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
