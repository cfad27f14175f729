"""Regenerate tests/data/spm_bpe: a Llama-2-style tokenizer (sentencepiece BPE, byte fallback) as HF files.

    pip install sentencepiece protobuf && python tests/data/make_spm_bpe.py

sentencepiece trains a 1000-piece BPE model with Llama-2's settings (identity normalization, byte
fallback, dummy prefix, split digits, whitespace-only pieces) on the built-in calibration split;
transformers' own sentencepiece extractor and LlamaTokenizer turn it into tokenizer.json, as for
Llama-2's published files. Not run by the tests (sentencepiece is not a dependency); its output is
committed.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
from transformers import LlamaTokenizer

from quantkit.data import load_documents

OUT = Path(__file__).parent / "spm_bpe"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(load_documents("builtin", "calib"))[:300_000], encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "tokenizer"), model_type="bpe", vocab_size=1000,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
            character_coverage=0.9995, max_sentence_length=100_000, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, minloglevel=2)
        extractor = importlib.import_module("transformers.convert_slow_tokenizer").SentencePieceExtractor
        pieces = extractor(str(Path(tmp) / "tokenizer.model")).extract(None)
        tokenizer = LlamaTokenizer(vocab=pieces["vocab"], merges=pieces["merges"], legacy=False, add_bos_token=True,
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        shutil.rmtree(OUT, ignore_errors=True)
        tokenizer.save_pretrained(OUT)
        shutil.copy(Path(tmp) / "tokenizer.model", OUT / "tokenizer.model")


if __name__ == "__main__":
    main()
