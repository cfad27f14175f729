"""GGUF files of the checkpoints people download, against llama.cpp's own converter and transformers.

For each published config (tiny sizes, every other field kept: quantkit_testing/published.py), quantkit's F32
file must carry the metadata llama.cpp's convert_hf_to_gguf.py writes (rope scaling keys, rope factor tensors,
the chat template, special token ids) but for the deliberate differences below, the same tensors byte for byte,
and compute transformers' distribution in llama.cpp; its RTN Q4_K_M must hold the bytes llama.cpp's quantizer
writes from the converter's F32 file; and llama.cpp's chat completion with the file's template must produce
what transformers' apply_chat_template + generate produce.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import quantkit
from quantkit_testing.llama_converter import convert
from quantkit_testing.published import PUBLISHED, save_published
from quantkit_testing.runtimes import require

llama_cpp = require("llama_cpp")

# Metadata quantkit writes differently from the converter, on purpose:
DELIBERATE = {
    # the converter guesses base name, fine-tune, version and size from the folder's name; quantkit names the file
    # after the folder and does not guess
    "general.name", "general.basename", "general.finetune", "general.version", "general.size_label", "general.type",
    "general.quantized_by",  # quantkit says it made the file
    # quantkit states add_bos_token even when tokenizer_config.json is silent (its tokenizer check relies on it)
    "tokenizer.ggml.add_bos_token",
}
# Keys quantkit adds whose values llama.cpp would derive anyway (head sizes, vocabulary size, rotary width)
DERIVED_SUFFIXES = (".attention.key_length", ".attention.value_length", ".vocab_size", ".rope.dimension_count")
LIST_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    found = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        found[key] = list(value) if key in LIST_FIELDS else value
    return found


def tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str, bytes]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name, bytes(np.asarray(t.data).tobytes()))
            for t in reader.tensors}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("published")
    return {name: save_published(root, name) for name in PUBLISHED}


@pytest.fixture(scope="module")
def shipped(published, tmp_path_factory):
    """quantkit's F32 (scored against transformers in llama.cpp) and RTN Q4_K_M files of each config, and the
    converter's F32 file with llama.cpp's own Q4_K_M of it."""
    files = {}
    for name, folder in published.items():
        out = tmp_path_factory.mktemp(f"ship-{name}")
        result = quantkit.ship(folder, targets=["gguf:F32"], out=out / "f32", eval_samples=2, seq_len=64,
                               progress=False, verbose=False)
        quantkit.ship(folder, targets=["gguf:Q4_K_M"], out=out / "q4", verify=False, progress=False, verbose=False)
        ours = out / "f32" / "model-F32.gguf"
        pre = metadata(ours)["tokenizer.ggml.pre"]  # the converter's pre-tokenizer detection answered with ours
        reference = convert(folder, out / "reference-F32.gguf", pre)
        quantized = out / "reference-Q4_K_M.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        assert llama_cpp.llama_model_quantize(str(reference).encode(), str(quantized).encode(), params) == 0
        files[name] = dict(result=result, ours=ours, ours_q4=out / "q4" / "model-Q4_K_M.gguf", reference=reference,
                           reference_q4=quantized, folder=folder)
    return files


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_f32_metadata_is_the_converters_but_for_deliberate_differences(shipped, name):
    ours, theirs = metadata(shipped[name]["ours"]), metadata(shipped[name]["reference"])
    differing = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)} - DELIBERATE
    derived = {k for k in differing if k.endswith(DERIVED_SUFFIXES) and k not in theirs}
    assert differing - derived == set(), {k: (ours.get(k), theirs.get(k)) for k in differing - derived}
    assert ours["tokenizer.chat_template"] == theirs["tokenizer.chat_template"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_f32_tensors_equal_the_converters_byte_for_byte(shipped, name):
    ours, theirs = tensors(shipped[name]["ours"]), tensors(shipped[name]["reference"])
    assert sorted(ours) == sorted(theirs)
    assert {n: t[:2] for n, t in ours.items()} == {n: t[:2] for n, t in theirs.items()}
    different = [n for n in ours if ours[n][2] != theirs[n][2]]
    assert different == [], different


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_f32_file_computes_transformers_distribution_in_llama_cpp(shipped, name):
    # only float summation order differs between llama.cpp's graph and transformers' on the same F32 weights:
    # ~1e-6 KLD; any wrong rope factor, scaling key or rotary width gives > 0.01
    metrics = shipped[name]["result"].artifacts[0].metrics
    assert metrics["kld"] < 1e-4 and metrics["top1"] > 0.99, metrics


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_q4_k_m_equals_llama_cpp_quantizer_from_the_converters_file(shipped, name):
    ours, theirs = tensors(shipped[name]["ours_q4"]), tensors(shipped[name]["reference_q4"])
    assert {n: t[:2] for n, t in ours.items()} == {n: t[:2] for n, t in theirs.items()}
    different = [n for n in ours if ours[n][2] != theirs[n][2]]
    assert different == [], different


CONVERSATION = [{"role": "user", "content": "Name a colour of the sky."},
                {"role": "assistant", "content": "Blue, on a clear day."},
                {"role": "user", "content": "And at night?"}]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_chat_completion_in_llama_cpp_follows_the_checkpoints_template(shipped, name):
    """llama.cpp renders the file's tokenizer.chat_template and decodes greedily; transformers renders the
    checkpoint's template and generates greedily: the same tokens (F32 logits agree to ~1e-6, so near-ties
    that could flip a greedy step are unlikely; a wrong template or a missing one changes the prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, n_new = shipped[name]["folder"], 8
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    generated = model.generate(prompt, max_new_tokens=n_new, do_sample=False)[0, prompt.shape[1]:]
    expected = tokenizer.decode(generated, skip_special_tokens=True)

    llm = llama_cpp.Llama(model_path=str(shipped[name]["ours"]), n_ctx=256, verbose=False, seed=0)
    try:
        reply = llm.create_chat_completion(messages=CONVERSATION, temperature=0.0, max_tokens=n_new)
    finally:
        llm.close()
    # eight tokens generated, not an immediate end of text (random weights may well pick whitespace tokens)
    assert len(generated) == n_new and expected
    assert reply["choices"][0]["message"]["content"] == expected


def test_a_rope_variant_llama_cpp_cannot_express_is_refused_by_name(published, tmp_path):
    import json
    import shutil

    from quantkit.errors import QuantkitError

    folder = tmp_path / "dynamic"
    shutil.copytree(published["mistral-7b-instruct-v0.3"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantkitError, match="rope type 'dynamic' cannot be expressed by the GGUF target"):
        quantkit.ship(folder, targets=["gguf:Q8_0"], out=tmp_path / "out", verify=False)
    assert not (tmp_path / "out").exists()


def test_onnx_genai_folder_renders_the_checkpoints_chat_template(published, tmp_path):
    """The onnx-genai folder carries the tokenizer files with the template: onnxruntime-genai's own tokenizer
    renders the conversation exactly as transformers does (Llama 3.2's config: its llama3 rope is expressible)."""
    import json

    from transformers import AutoTokenizer

    og = require("onnxruntime_genai")
    folder = published["llama-3.2-1b-instruct"]
    result = quantkit.ship(folder, targets=["onnx-genai"], out=tmp_path / "out", group_size=32, verify=False)
    model = og.Model(str(result.out_dir / result.artifacts[0].path))
    rendered = og.Tokenizer(model).apply_chat_template(json.dumps(CONVERSATION), add_generation_prompt=True)
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                                          tokenize=False)
    assert rendered == expected and "<|assistant|>" in rendered


# one config per mechanism the builder must get right (each of the seven passes; four keep the suite short):
# llama3 rope at base 500000, q/k/v biases, longrope with a partial rotary width and fused linears, Gemma 3's
# two rope bases with linear scaling on the global layers only
GENAI_CHECKED = ("llama-3.2-1b-instruct", "qwen2.5-0.5b-instruct", "phi-4-mini-instruct", "gemma-3-4b-it")


@pytest.mark.parametrize("name", GENAI_CHECKED)
def test_onnx_genai_computes_what_transformers_computes_from_the_same_integers(published, tmp_path, name):
    """onnxruntime-genai's model builder over quantkit's 8-bit integers, run in onnxruntime-genai, scores as
    transformers scores quantkit's GPTQ checkpoint of the same integers: each family's rope (llama3, linear on
    Gemma 3's global layers only, longrope with a partial rotary width), windows, norms and tying come through.
    Tolerance: both run fp32 activations over equal weights; what differs is the order of float sums in fused
    kernels (~1e-6 of a logit), far below the 1e-3 of perplexity a wrong rope or norm costs (Gemma-3-4B's
    sliding layers with the global scaling: top-1 0.79)."""
    result = quantkit.ship(published[name], targets=["onnx-genai:fp32", "hf-gptq"], out=tmp_path / "out", bits=8,
                           group_size=32, eval_samples=2, seq_len=64, progress=False)
    genai, gptq = (art.metrics for art in result.artifacts)
    assert genai["positions"] == gptq["positions"] > 100
    assert genai["perplexity"] == pytest.approx(gptq["perplexity"], rel=1e-3)
    assert abs(genai["top1"] - gptq["top1"]) <= 0.01
