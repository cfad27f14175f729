"""Resume a layer-by-layer pass after the process died (kill -9, a lost worker).

After each block, the pass writes what the block produced (its quantized weights, the float tensors the
method rescaled, the experts that fell back) and the inputs of the next block, each to a temporary name
renamed into place. A rerun of the same run (same cache key) loads blocks ``0..k`` and continues at block
``k + 1``; since it starts from the exact tensors the first run had, it ends with the same bytes.

Only the newest block's next inputs are kept (calibration rows x sequence x hidden floats: ~38 MB on
SmolLM2 with 32 x 512 tokens, ~4 GB on an 8B model with 128 x 2048), so the folder holds one set of
activations plus the quantized weights done so far.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import torch

BLOCK_FILE = re.compile(r"block-(\d{5})\.pt")


def pass_folder(root: Path, grid: object) -> Path:
    """One folder per pass: the grid (or grid plan) by its repr, which names every grid and override."""
    return root / hashlib.sha256(repr(grid).encode()).hexdigest()[:20]


class PassCheckpoint:
    """The finished blocks of one layer-by-layer pass, on disk."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _block(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.pt"

    def _inputs(self, index: int) -> Path:
        return self.folder / f"inputs-after-{index:05d}.pt"

    def last_finished(self) -> int:
        """The last block whose results and following inputs are both on disk; -1 when none is."""
        done = sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := BLOCK_FILE.fullmatch(p.name)))
        finished = [i for i in done if self._inputs(i).is_file()]
        if not finished or done[: finished[-1] + 1] != list(range(finished[-1] + 1)):
            return -1
        return finished[-1]

    def load(self, last: int) -> tuple[list[dict], list[torch.Tensor]]:
        """Blocks ``0..last``'s saved results and the inputs of block ``last + 1``."""
        blocks = [torch.load(self._block(i), weights_only=False) for i in range(last + 1)]
        return blocks, torch.load(self._inputs(last), weights_only=False)

    def save(self, index: int, block: dict, next_inputs: list[torch.Tensor]) -> None:
        _write(self._block(index), block)
        _write(self._inputs(index), next_inputs)
        if index > 0:
            self._inputs(index - 1).unlink(missing_ok=True)


def _write(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)


def discard(root: Path) -> None:
    """A finished run's resume folder: nothing left to resume."""
    shutil.rmtree(root, ignore_errors=True)
