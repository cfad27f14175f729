"""An onnxruntime session over a quantkit decoder graph with its KV cache: used by the ONNX/ORT targets to
score artifacts and by the benchmark runner (which must not import torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OnnxDecoder:
    """An onnxruntime session over a quantkit decoder graph (``.onnx`` or ``.ort``), with its KV cache."""

    def __init__(self, model_file: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.float_dtype = np.float16 if "float16" in self.past_inputs[0].type else np.float32

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, i.shape[1], 0, i.shape[3]), self.float_dtype) for i in self.past_inputs]

    def forward(self, ids: np.ndarray, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of ``ids`` (B, S) after ``past`` (the cache of earlier tokens) and the updated cache."""
        batch, new = ids.shape
        past = past if past is not None else self.empty_cache(batch)
        done = past[0].shape[2]
        feeds = {"input_ids": ids.astype(np.int64),
                 "attention_mask": np.ones((batch, done + new), np.int64),
                 "position_ids": np.broadcast_to(np.arange(done, done + new, dtype=np.int64), (batch, new)).copy()}
        feeds.update({i.name: p for i, p in zip(self.past_inputs, past, strict=True)})
        logits, *present = self.session.run(self.output_names, feeds)
        return logits, present


def greedy_generate(model_file: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding with the KV cache: the prompt in one pass, then one token per step."""
    decoder = OnnxDecoder(model_file)
    logits, cache = decoder.forward(np.asarray([prompt], np.int64))
    out = []
    for _ in range(new_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        logits, cache = decoder.forward(np.asarray([[token]], np.int64), cache)
    return out
