"""The unquantized model's outputs on the evaluation rows, what every artifact is compared with.

The reference runs in transformers, in float32, one decoder block at a time. Full-vocabulary logits
of every row would be rows x positions x vocabulary floats (GBs at a 128k vocabulary), so only the
final hidden states are kept, in a scratch file; each row's log-probabilities are recomputed from them
through the output matrix when an artifact is scored, a chunk of positions at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantkit.checks import MetricAccumulator, Metrics
from quantkit.data import TokenSamples
from quantkit.model import ModelSource
from quantkit.streaming import BlockStreamer, FileStore, OutputProjection, run_blocks

SCRATCH_NAME = "reference-hidden.f32"


class _RowLogits:
    """One row's logits, computed for the positions asked for."""

    def __init__(self, head: OutputProjection, hidden: torch.Tensor):
        self.head, self.hidden = head, hidden

    def __getitem__(self, positions: slice) -> torch.Tensor:
        return self.head(self.hidden[positions])


class Reference:
    def __init__(self, source: ModelSource, samples: TokenSamples, scratch: Path, progress: bool = False):
        rows, seq = samples.ids.shape
        hidden = int(source.config["hidden_size"])
        self.store = FileStore(scratch / SCRATCH_NAME, (1, seq, hidden))
        try:
            run_blocks(BlockStreamer(source), samples.ids, self.store, progress, label="reference")
            self.head = OutputProjection(source)
            accumulator = MetricAccumulator()
            for row in range(rows):
                accumulator.add(row, samples.ids[row], self.row_logits(row))
            self.metrics: Metrics = accumulator.result()
        except BaseException:
            self.close()
            raise

    def row_logits(self, row: int) -> _RowLogits:
        return _RowLogits(self.head, self.store.read(row)[0])

    def logprobs(self, row: int, start: int, stop: int) -> torch.Tensor:
        return torch.log_softmax(self.row_logits(row)[start:stop], dim=-1)

    def close(self) -> None:
        self.store.close()
