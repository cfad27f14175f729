"""Accuracy metrics and gates against hand-computed values."""

import math

import pytest
import torch

from quantkit.checks import Gate, Metrics, default_gate, gate_for, score


def _reference(logits: torch.Tensor) -> list[torch.Tensor]:
    return [torch.log_softmax(row[:-1], -1) for row in logits]


def test_uniform_logits_have_vocab_perplexity():
    ids = torch.tensor([[1, 2, 3, 0, 5]])
    m = score(ids, torch.zeros(1, 5, 8), None, None)
    assert m.perplexity == pytest.approx(8.0)
    assert m.positions == 4 and m.kld is None


def test_identical_logits_agree_fully():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 10)
    ids = torch.randint(0, 10, (2, 6))
    ref = _reference(logits)
    m = score(ids, logits, ref, reference_ppl=score(ids, logits, None, None).perplexity)
    assert m.kld == pytest.approx(0.0, abs=1e-7)
    assert m.top1 == 1.0
    assert m.ppl_increase_pct == pytest.approx(0.0, abs=1e-9)


def test_kld_and_top1_by_hand():
    # two positions, vocab 2. reference p = (0.5, 0.5) then (0.8, 0.2); artifact uniform twice.
    ref_logits = torch.tensor([[[0.0, 0.0], [math.log(0.8), math.log(0.2)], [0.0, 0.0]]])
    art_logits = torch.zeros(1, 3, 2)
    ids = torch.tensor([[0, 1, 0]])
    m = score(ids, art_logits, _reference(ref_logits), reference_ppl=1.0)
    kld2 = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert m.kld == pytest.approx(kld2 / 2)
    # argmax of a tie is index 0 in both at position 1; position 2: ref 0 vs artifact 0 -> both agree
    assert m.top1 == 1.0
    assert m.perplexity == pytest.approx(2.0)
    assert m.ppl_increase_pct == pytest.approx(100.0)


def test_gate_failures_name_each_limit():
    gate = Gate(max_ppl_increase_pct=1.0, max_kld=0.01, min_top1=0.9)
    ok = Metrics(perplexity=10, kld=0.005, top1=0.95, ppl_increase_pct=0.5)
    bad = Metrics(perplexity=10, kld=0.02, top1=0.8, ppl_increase_pct=2.0)
    assert gate.failures(ok) == []
    assert [f.split()[0] for f in gate.failures(bad)] == ["ppl", "KLD", "top-1"]


def test_default_gates_tighten_with_bits_and_accept_overrides():
    assert default_gate(8.5).max_ppl_increase_pct < default_gate(4.5).max_ppl_increase_pct
    assert default_gate(2.6).min_top1 < default_gate(5.5).min_top1
    gate = gate_for(4.5, {"max_kld": 0.5, "min_top1": None, "max_ppl_increase_pct": None})
    assert gate.max_kld == 0.5 and gate.min_top1 == default_gate(4.5).min_top1
