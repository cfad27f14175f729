"""An onnxruntime-genai model folder: quantkit's ONNX decoder (KV cache, MatMulNBits from quantkit's own
integers) with ``genai_config.json`` and the tokenizer files, so an app hands the folder to
``onnxruntime_genai`` (``og.Model(folder)``, ``og.Generator``) and gets its generation loop, sampling and
tokenizer without writing any. Checked in onnxruntime-genai itself: the same accuracy gate on the logits
its generator computes, and its tokenizer against tokenizer.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quantkit.arch.base import hparam
from quantkit.errors import QuantkitError
from quantkit.model import ModelSource
from quantkit.targets.base import ExportContext, ExportReport
from quantkit.targets.gguf import first_difference
from quantkit.targets.onnx import MODEL_FILE, ONNXTarget

CONFIG_FILE = "genai_config.json"
INSTALL_HINT = "pip install 'quantkit[onnx]' (onnxruntime-genai)"


def _require_genai():
    try:
        import onnxruntime_genai
    except ImportError:
        raise QuantkitError(f"the onnx-genai target needs onnxruntime-genai; {INSTALL_HINT}") from None
    return onnxruntime_genai


def genai_config(source: ModelSource, context_length: int) -> dict:
    """The folder's genai_config.json: the decoder's shapes and input/output names (what quantkit's ONNX graph
    uses), special tokens, and greedy search by default (generation_config.json may ask for sampling)."""
    cfg = source.config
    heads = hparam(cfg, "num_attention_heads")
    generation = {}
    if (source.path / "generation_config.json").is_file():
        generation = json.loads((source.path / "generation_config.json").read_text())
    eos = generation.get("eos_token_id", cfg.get("eos_token_id"))
    return {
        "model": {
            "bos_token_id": generation.get("bos_token_id", cfg.get("bos_token_id")),
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": cfg.get("head_dim") or hparam(cfg, "hidden_size") // heads,
                "hidden_size": hparam(cfg, "hidden_size"),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": source.n_layers,
                "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
            },
            "eos_token_id": eos,
            "pad_token_id": generation.get("pad_token_id", cfg.get("pad_token_id")) or
            (eos[0] if isinstance(eos, list) else eos),
            "type": source.arch.genai_type,
            "vocab_size": hparam(cfg, "vocab_size"),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": bool(generation.get("do_sample", False)), "early_stopping": True,
            "length_penalty": 1.0, "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0,
            "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)), "top_k": int(generation.get("top_k", 1)),
            "top_p": float(generation.get("top_p", 1.0)),
        },
    }


class OnnxGenaiTarget(ONNXTarget):
    kind = "onnx-genai"

    def validate(self, ctx: ExportContext) -> None:
        _require_genai()
        super().validate(ctx)
        if ctx.source.arch.genai_type is None:
            raise QuantkitError(f"{self.kind}: onnxruntime-genai has no model type for {ctx.source.arch.name}; "
                                "use the onnx target")

    def export(self, ctx: ExportContext, path: Path) -> ExportReport:
        report = super().export(ctx, path)
        context = int(hparam(ctx.source.config, "max_position_embeddings"))
        (path / CONFIG_FILE).write_text(json.dumps(genai_config(ctx.source, context), indent=2) + "\n")
        return report

    def logits(self, path: Path, ids: torch.Tensor, progress: bool = True) -> Iterator[np.ndarray]:
        """Each row appended to a fresh generator as one prompt; the logits its decoder computed for every
        position (the same forward its generation loop runs)."""
        og = _require_genai()
        model = og.Model(str(path))
        for row in tqdm(ids, desc=f"onnxruntime-genai {path.name}", unit="seq", disable=not progress,
                        leave=False):
            params = og.GeneratorParams(model)
            # the prompt alone: its logits are what is scored, and a row as long as the model's context
            # (the default --seq-len on a 512-position model) must not ask for one position more
            params.set_search_options(max_length=row.numel(), batch_size=1)
            generator = og.Generator(model, params)
            generator.append_tokens(row.numpy()[None].astype(np.int32))
            yield np.asarray(generator.get_output("logits"))[0].astype(np.float32)

    def verify_tokenizer(self, path: Path, tokenizer, texts: list[str]) -> dict | None:
        """onnxruntime-genai's tokenizer (its own implementation, read from the folder's tokenizer.json) against
        transformers' on the evaluation texts."""
        og = _require_genai()
        ours = og.Tokenizer(og.Model(str(path)))
        mismatched, tokens, first = 0, 0, None
        for text in texts:
            theirs = list(tokenizer.encode(text, add_special_tokens=False))
            got = [int(t) for t in ours.encode(text)]
            tokens += len(theirs)
            if got != theirs:
                mismatched += 1
                first = first or first_difference(text, theirs, got, tokenizer)
        result = {"texts": len(texts), "tokens": tokens, "mismatched_texts": mismatched, "match": mismatched == 0}
        if first:
            result["first_mismatch"] = first
        return result

    def runtime(self) -> dict:
        versions = {package: metadata.version(package) for package in ("onnxruntime-genai", "onnxruntime")}
        return {"name": "onnxruntime-genai", "version": versions}
