"""Accuracy checks: perplexity, KL divergence and top-1 agreement against the reference, and gates.

Every artifact is scored from logits its own runtime produced on the same evaluation token ids as
the unquantized reference model. Position t's logits predict token t + 1, so each sequence of n
tokens contributes n - 1 scored positions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class Metrics:
    perplexity: float
    kld: float | None = None  # mean KL(reference || artifact) per position, nats
    top1: float | None = None  # share of positions where the argmax token agrees with the reference
    ppl_increase_pct: float | None = None
    positions: int = 0

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class ReferenceLogprobs(Protocol):
    def logprobs(self, row: int, start: int, stop: int) -> torch.Tensor:
        """Log-probabilities of positions ``start:stop`` of evaluation row ``row``, ``(stop - start, vocab)``."""


class LogprobRows:
    """Reference log-probs held in memory, one ``(positions, vocab)`` tensor per row."""

    def __init__(self, rows: list[torch.Tensor]):
        self.rows = rows

    def logprobs(self, row: int, start: int, stop: int) -> torch.Tensor:
        return self.rows[row][start:stop]


# Positions scored at once: bounds the float32 (positions x vocab) temporaries (64 MiB at a 128k vocabulary).
POSITION_CHUNK = 128


class MetricAccumulator:
    """Streams per-sequence logits and compares them with the reference's log-probs, a chunk of positions at
    a time; ``reference`` may be a list of per-row log-prob tensors or any ``ReferenceLogprobs``."""

    def __init__(self, reference: ReferenceLogprobs | list[torch.Tensor] | None = None):
        self.reference = LogprobRows(reference) if isinstance(reference, list) else reference
        self.nll = 0.0
        self.kld = 0.0
        self.agree = 0
        self.positions = 0
        self.logprobs: list[torch.Tensor] = []

    def add(self, index: int, ids: torch.Tensor, logits, keep: bool = False) -> None:
        """``logits``: the row's ``(positions, vocab)`` logits, anything sliced by position into an array."""
        scored = len(ids) - 1
        targets = ids[1:].long()
        kept = []
        for start in range(0, scored, POSITION_CHUNK):
            stop = min(start + POSITION_CHUNK, scored)
            chunk = torch.as_tensor(np.asarray(logits[start:stop]), dtype=torch.float32)
            logprobs = torch.log_softmax(chunk, dim=-1)
            self.nll -= logprobs.gather(1, targets[start:stop, None]).sum().item()
            if self.reference is not None:
                ref = self.reference.logprobs(index, start, stop)
                self.kld += (ref.exp() * (ref - logprobs)).sum().item()
                self.agree += int((ref.argmax(-1) == logprobs.argmax(-1)).sum())
            if keep:
                kept.append(logprobs)
        self.positions += scored
        if keep:
            self.logprobs.append(torch.cat(kept))

    def result(self, reference_ppl: float | None = None) -> Metrics:
        ppl = math.exp(self.nll / self.positions)
        m = Metrics(perplexity=ppl, positions=self.positions)
        if self.reference is not None:
            m.kld = self.kld / self.positions
            m.top1 = self.agree / self.positions
        if reference_ppl:
            m.ppl_increase_pct = 100.0 * (ppl / reference_ppl - 1.0)
        return m


def score(ids: torch.Tensor, logits: Iterable, reference: ReferenceLogprobs | list[torch.Tensor] | None,
          reference_ppl: float | None) -> Metrics:
    acc = MetricAccumulator(reference)
    for i, (row, row_logits) in enumerate(zip(ids, logits, strict=True)):
        acc.add(i, row, row_logits)
    return acc.result(reference_ppl)


@dataclass(frozen=True)
class Gate:
    """Limits an artifact must meet; ``None`` disables a limit."""

    max_ppl_increase_pct: float | None
    max_kld: float | None
    min_top1: float | None

    def failures(self, m: Metrics) -> list[str]:
        out = []
        if self.max_ppl_increase_pct is not None and m.ppl_increase_pct > self.max_ppl_increase_pct:
            out.append(f"ppl +{m.ppl_increase_pct:.2f}% > {self.max_ppl_increase_pct}%")
        if self.max_kld is not None and m.kld > self.max_kld:
            out.append(f"KLD {m.kld:.4f} > {self.max_kld}")
        if self.min_top1 is not None and m.top1 < self.min_top1:
            out.append(f"top-1 {m.top1:.3f} < {self.min_top1}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


# Default gates by bits per weight. Limits leave room for a small model's larger sensitivity;
# 8-bit must stay near-lossless, lower bit widths are held to what the method can reasonably reach.
DEFAULT_GATES: list[tuple[float, Gate]] = [
    (7.5, Gate(max_ppl_increase_pct=1.5, max_kld=0.01, min_top1=0.95)),
    (5.0, Gate(max_ppl_increase_pct=5.0, max_kld=0.05, min_top1=0.90)),
    (3.5, Gate(max_ppl_increase_pct=20.0, max_kld=0.20, min_top1=0.75)),
    (0.0, Gate(max_ppl_increase_pct=60.0, max_kld=0.60, min_top1=0.55)),
]


def default_gate(bits_per_weight: float) -> Gate:
    return next(gate for floor, gate in DEFAULT_GATES if bits_per_weight >= floor)


def gate_for(bits_per_weight: float, overrides: dict[str, float | None]) -> Gate:
    """The default gate for ``bits_per_weight`` with any user overrides applied."""
    base = asdict(default_gate(bits_per_weight))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return Gate(**base)
