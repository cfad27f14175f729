"""GGUF files in llama.cpp itself (llama-cpp-python): loading, tokenization, logits, and byte
identity with llama.cpp's own quantizer."""

from pathlib import Path

import gguf
import llama_cpp  # a required test dependency: the real GGUF runtime
import numpy as np
import pytest
import torch

from quantkit.data import load_documents
from quantkit.methods import RoundToNearest
from quantkit.model import ModelSource
from quantkit.recipe import Recipe, quantized_tensor_names
from quantkit.targets import ExportContext, parse_target

LLAMA_FTYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
                "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
                "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
                "Q5_K": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                "Q3_K": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K"}


def export(model_dir, gguf_type: str, path: Path, **recipe) -> Path:
    src = ModelSource(model_dir)
    r = Recipe(**recipe)
    method = RoundToNearest()
    ctx = ExportContext(src, r, quantized_tensor_names(src, r),
                        quantize=lambda name, grid: method.quantize_weight(src.load(name), grid), progress=False)
    target = parse_target(f"gguf:{gguf_type}")
    target.validate(ctx)
    target.export(ctx, path)
    return path


def llama_quantize(src: Path, dst: Path, gguf_type: str, pure: bool) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[gguf_type])
    params.pure = pure
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return dst


def tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def default_f32(tmp_path_factory) -> Path:
    return export(None, "F32", tmp_path_factory.mktemp("gguf") / "model-F32.gguf")


@pytest.mark.parametrize("gguf_type", sorted(LLAMA_FTYPES))
def test_every_tensor_byte_identical_to_llama_cpp_quantizer(default_f32, tmp_path, gguf_type):
    """All 2-D tensors (embeddings and lm_head included) quantized: llama.cpp's pure mode does the same."""
    ours = tensors(export(None, gguf_type, tmp_path / "ours.gguf", quantize_embeddings=True, quantize_lm_head=True))
    theirs = tensors(llama_quantize(default_f32, tmp_path / "theirs.gguf", gguf_type, pure=True))
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert ours[name].data.tobytes() == t.data.tobytes(), name


def test_default_recipe_matches_llama_cpp_on_block_linears(default_f32, tmp_path):
    """With default settings (embeddings / lm_head not quantized) every quantized tensor still matches."""
    ours = tensors(export(None, "Q4_0", tmp_path / "ours.gguf"))
    theirs = tensors(llama_quantize(default_f32, tmp_path / "theirs.gguf", "Q4_0", pure=False))
    quantized = [n for n, t in ours.items() if t.tensor_type == gguf.GGMLQuantizationType.Q4_0]
    assert len(quantized) == 4 * 7
    for name in quantized:
        assert ours[name].data.tobytes() == theirs[name].data.tobytes(), name
    assert ours["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def test_llama_cpp_tokenizes_eval_text_like_hf(default_f32):
    from quantkit.targets.gguf import GGUFTarget

    docs = load_documents("builtin", "eval")
    check = GGUFTarget("F32").verify_tokenizer(default_f32, ModelSource().tokenizer(), docs)
    assert check["texts"] == len(docs) and check["tokens"] > 50_000
    assert check["mismatched_texts"] == 0


def _max_logit_error(model_dir, gguf_path: Path, seq_len: int = 64) -> tuple[float, float]:
    src = ModelSource(model_dir)
    ids = torch.randint(1, src.config["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = src.hf_model()(input_ids=ids).logits[0].numpy()
    ours = next(parse_target("gguf:F32").logits(gguf_path, ids, progress=False))
    return float(np.abs(ours - ref).max()), float(np.abs(ref).max())


def test_f32_logits_equal_transformers_on_default_model(default_f32):
    err, scale = _max_logit_error(None, default_f32, seq_len=256)
    # same weights in fp32; llama.cpp sums in a different order (and uses its own exp/rope code)
    assert err < 2e-3 * max(1.0, scale), (err, scale)


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral", "qwen2"])
def test_f32_logits_equal_transformers_for_each_architecture(tiny_models, tmp_path, name):
    """Checks the rope permutation (llama, mistral), biases (qwen2) and tied embeddings in llama.cpp."""
    path = export(tiny_models[name], "F32", tmp_path / f"{name}.gguf")
    err, scale = _max_logit_error(tiny_models[name], path)
    assert err < 2e-3 * max(1.0, scale), (err, scale)
    if name == "llama-tied":
        assert "output.weight" not in tensors(path)



@pytest.mark.parametrize("regex_name,pre", [("LLAMA3_REGEX", "llama-bpe"), ("QWEN2_REGEX", "qwen2")])
def test_split_regex_pre_tokenizers_tokenize_like_hf(tiny_llama, tmp_path, regex_name, pre):
    """A byte-level BPE with the Llama-3 / Qwen2 split rule is detected and tokenized identically."""
    import json

    from quantkit.targets import gguf_vocab
    from quantkit.targets.gguf import GGUFTarget

    spec = json.loads((tiny_llama / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": getattr(gguf_vocab, regex_name)}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (tiny_llama / "tokenizer.json").write_text(json.dumps(spec))
    assert gguf_vocab.read_vocab(tiny_llama).pre == pre
    path = export(tiny_llama, "F32", tmp_path / "m.gguf")
    docs = load_documents("builtin", "eval")[:10] + ["Numbers 1234567 and 'LL 'Re\r\n\r\n  x", "naïve café ünïcode"]
    check = GGUFTarget("F32").verify_tokenizer(path, ModelSource(tiny_llama).tokenizer(), docs)
    assert check["mismatched_texts"] == 0, check


def test_unknown_pre_tokenizer_is_refused(tiny_llama, tmp_path):
    import json

    from quantkit.errors import QuantkitError

    spec = json.loads((tiny_llama / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (tiny_llama / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(QuantkitError, match="cannot identify the tokenizer's pre-tokenizer"):
        export(tiny_llama, "F32", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("gguf_type", ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1",
                                       "Q4_0", "Q3_K", "Q2_K"])
def test_every_type_loads_and_tracks_f32_in_llama_cpp(default_f32, tmp_path, gguf_type):
    path = export(None, gguf_type, tmp_path / f"{gguf_type}.gguf")
    ids = torch.randint(1, 4096, (1, 128), generator=torch.Generator().manual_seed(2))
    ref = next(parse_target("gguf:F32").logits(default_f32, ids, progress=False))
    got = next(parse_target(f"gguf:{gguf_type}").logits(path, ids, progress=False))
    agreement = (ref.argmax(-1) == got.argmax(-1)).mean()
    # 16-bit files hold the bf16 weights exactly (F16: within its range); llama.cpp rounds activations
    # to 16 bits for those matmuls, so they agree almost always; 4-5 bit types agree less often.
    floor = 0.98 if gguf_type in ("F16", "BF16", "Q8_0") else 0.5 if gguf_type in ("Q3_K", "Q2_K") else 0.7
    assert agreement > floor, agreement


@pytest.mark.parametrize("mix", ["Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M"])
def test_mixes_equal_llama_cpp_file_types(default_f32, tmp_path, mix):
    """Every tensor gets the type llama.cpp's mix gives it, with identical bytes."""
    ours = tensors(export(None, mix, tmp_path / "ours.gguf"))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    assert llama_cpp.llama_model_quantize(str(default_f32).encode(), str(tmp_path / "theirs.gguf").encode(),
                                          params) == 0
    theirs = tensors(tmp_path / "theirs.gguf")
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, (name, ours[name].tensor_type, t.tensor_type)
        assert ours[name].data.tobytes() == t.data.tobytes(), name
    assert {t.tensor_type.name for t in ours.values()} >= {mix[:4], "F32"}
    from quantkit.targets.gguf_mixes import MIXES

    assert MIXES[mix].file_type == params.ftype


def test_mix_falls_back_for_rows_that_do_not_fit(tiny_models, tmp_path):
    """The tiny model's 128-wide rows fit no 256 super-block: llama.cpp's fallback types, reported."""
    from quantkit.targets.gguf import GGUFTarget

    target = GGUFTarget("Q4_K_M")
    src = ModelSource(tiny_models["llama"])
    plan = {t.gguf_name: t.ggml_type.name for t in target.plan(src, set())}
    assert plan["blk.0.attn_q.weight"] == "Q5_0" and plan["output.weight"] == "Q8_0"
    assert any("blk.0.attn_q.weight: rows of 128 do not fit Q4_K; written as Q5_0" in n for n in target.notes())
