"""One llm-compressor run for benchmarks/peers.py, executed with llm-compressor's own interpreter.

    /path/to/llmcompressor-venv/bin/python benchmarks/peer_llmcompressor.py IDS.npz OUT.npz METHOD SCHEME ORDER \
        [MODEL_DIR BITS GROUP_SIZE]

llm-compressor 0.14 caps transformers at 5.17, so it lives in its own virtual environment (see
../shared/docs/stack.md). This script quantizes the embedded model from the calibration ids in
IDS.npz (or MODEL_DIR on a BITS-bit, GROUP_SIZE grid), saves the compressed-tensors checkpoint,
reloads it with transformers (which decodes
compressed-tensors) and writes the evaluation logits and the quantization wall time to OUT.npz;
peers.py scores them against the same reference as every other row. It imports nothing of quantkit.
ORDER is off (``actorder=None`` on the modifier: without it llm-compressor 0.14 applies "static" even when
the scheme asks for none), static, or group (run as its "weight" ordering: 0.14's GPTQ takes weight/static
here, not g_idx-style group ordering).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODEL = Path(__file__).resolve().parents[1] / "quantkit" / "assets" / "default_model"


def _cpu_friendly_awq() -> None:
    """llm-compressor's activation cache pins memory, which needs CUDA; on CPU pinning is pointless."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if hasattr(IntermediatesCache, "pin_memory"):
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def main() -> None:
    ids_path, out_path, method, scheme, order = sys.argv[1:6]
    model_dir = Path(sys.argv[6]) if len(sys.argv) > 6 else MODEL
    bits, group_size = (int(sys.argv[7]), int(sys.argv[8])) if len(sys.argv) > 8 else (4, 128)
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    ids = np.load(ids_path)
    calib, evals = ids["calib"], ids["eval"]
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": np.ones_like(calib).tolist()})
    weights = {"num_bits": bits, "type": "int", "symmetric": scheme == "sym", "strategy": "group",
               "group_size": group_size}
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        actorder = {"off": None, "static": "static", "group": "weight"}[order]
        recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                              ignore=["lm_head"], dampening_frac=0.01, actorder=actorder)
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        _cpu_friendly_awq()
        recipe = AWQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                             ignore=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=calib.shape[1],
                num_calibration_samples=calib.shape[0])
        model.save_pretrained(tmp, save_compressed=True)
        seconds = time.time() - start
        loaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        loaded.eval()
        with torch.no_grad():
            logits = np.stack([loaded(input_ids=torch.from_numpy(row)[None]).logits[0].numpy() for row in evals])
    np.savez(out_path, logits=logits, seconds=np.array(seconds))


if __name__ == "__main__":
    main()
