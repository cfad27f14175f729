"""GGUF files in llama.cpp itself (llama-cpp-python): loading, tokenization, logits, and byte
identity with llama.cpp's own quantizer."""

import ctypes
import functools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from quantkit.data import load_documents
from quantkit.grids.ggml_lib import use_engine
from quantkit.model import ModelSource
from quantkit.recipe import Recipe, quantized_tensor_names
from quantkit.targets.base import ExportContext
from quantkit.targets.registry import parse_target
from quantkit_testing.helpers import export
from quantkit_testing.runtimes import require

llama_cpp = require("llama_cpp")  # the real GGUF runtime

# every quantized file type quantkit offers (Q2_K_S, which needs an importance matrix, has its own test)
FILE_TYPES = ["Q8_0", "Q6_K", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L",
              "Q3_K_M", "Q3_K_S", "Q2_K"]
GGMLType = gguf.GGMLQuantizationType


@functools.cache
def _source(model_dir) -> ModelSource:
    return ModelSource(model_dir)




def llama_quantize(src: Path, dst: Path, gguf_type: str, pure: bool = False, overrides: tuple = (),
                   token_embd: str | None = None, output: str | None = None, imatrix: dict | None = None) -> Path:
    """llama.cpp's own quantizer, with the options of llama-quantize (--pure, --tensor-type, ...)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    params.pure = pure
    if token_embd:
        params.token_embedding_type = GGMLType[token_embd].value
    if output:
        params.output_tensor_type = GGMLType[output].value
    if overrides:  # NULL-terminated array of (regex, type)
        table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for row, (pattern, type_name) in zip(table, overrides, strict=False):
            row.pattern, row.type = pattern.encode(), GGMLType[type_name].value
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if imatrix:  # NULL-terminated array of (tensor name, importance per input column)
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        buffers = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
        for row, name, buf in zip(entries, imatrix, buffers, strict=False):
            row.name, row.size = name.encode(), buf.size
            row.data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return dst


def tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def assert_same_tensors(ours: dict, theirs: dict, names=None) -> None:
    assert ours.keys() == theirs.keys()
    for name in names or theirs:
        assert ours[name].tensor_type == theirs[name].tensor_type, (name, ours[name].tensor_type,
                                                                    theirs[name].tensor_type)
        assert ours[name].data.tobytes() == theirs[name].data.tobytes(), name


@pytest.fixture(scope="module")
def default_f32(tmp_path_factory) -> Path:
    return export(None, "F32", tmp_path_factory.mktemp("gguf") / "model-F32.gguf")


@pytest.mark.parametrize("pure,engine", [(False, "ggml"), (True, "torch")], ids=["rules-ggml", "pure-torch"])
@pytest.mark.parametrize("gguf_type", FILE_TYPES)
def test_every_file_type_byte_identical_to_llama_cpp_quantizer(default_f32, tmp_path, gguf_type, pure, engine):
    """Every tensor (embedding and output included) gets llama.cpp's type for the file type, with its bytes;
    --pure equals llama_model_quantize with params.pure. The rules run through ggml's quantizer in
    quantkit's streaming writer, the pure files through the torch reference grids."""
    with use_engine(engine):
        ours = tensors(export(None, gguf_type, tmp_path / "ours.gguf", pure=pure))
    theirs = tensors(llama_quantize(default_f32, tmp_path / "theirs.gguf", gguf_type, pure=pure))
    assert_same_tensors(ours, theirs)
    base = parse_target(f"gguf:{gguf_type}").file_type.base
    types = {t.tensor_type.name for t in ours.values()}
    assert {base, "F32"} <= types and (types == {base, "F32"} or not pure)
    if not pure and gguf_type != "Q8_0":  # llama.cpp's file types keep the output projection in Q6_K
        assert ours["output.weight"].tensor_type == GGMLType.Q6_K


@pytest.mark.parametrize("float_type", ["F16", "BF16"])
def test_float_files_byte_identical_to_llama_cpp_quantizer(default_f32, tmp_path, float_type):
    """16-bit files hold what llama.cpp's converter would: matrices rounded to nearest-even, norms in F32."""
    ours = tensors(export(None, float_type, tmp_path / "ours.gguf"))
    theirs = tensors(llama_quantize(default_f32, tmp_path / "theirs.gguf", float_type))
    assert_same_tensors(ours, theirs)
    assert {t.tensor_type.name for t in ours.values()} == {float_type, "F32"}


def test_file_types_follow_llama_cpp_names(default_f32, tmp_path):
    """gguf:Q4_0 is llama.cpp's Q4_0 (output Q6_K); gguf:Q4_K is an alias of Q4_K_M, as in llama-quantize."""
    from quantkit.targets.gguf import GGUFTarget

    q4_0 = tensors(export(None, "Q4_0", tmp_path / "q4_0.gguf"))
    assert q4_0["token_embd.weight"].tensor_type == GGMLType.Q4_0
    assert q4_0["output.weight"].tensor_type == GGMLType.Q6_K
    alias = GGUFTarget("q4_k")
    assert alias.name == "gguf:Q4_K_M" and alias.filename() == "model-Q4_K_M.gguf"
    file_type = gguf.GGUFReader(tmp_path / "q4_0.gguf").fields["general.file_type"].contents()
    assert file_type == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0


def test_llama_cpp_tokenizes_eval_text_like_hf(default_f32):
    from quantkit.targets.gguf import GGUFTarget

    docs = load_documents("builtin", "eval")
    check = GGUFTarget("F32").verify_tokenizer(default_f32, ModelSource().tokenizer(), docs)
    assert check["texts"] == len(docs) and check["tokens"] > 50_000
    assert check["mismatched_texts"] == 0


def first_row_logits(target: str, path: Path, ids: torch.Tensor) -> np.ndarray:
    rows = parse_target(target).logits(path, ids, progress=False)  # held: the runtime lives as long as it does
    return np.asarray(next(rows))


def _max_logit_error(model_dir, gguf_path: Path, seq_len: int = 64) -> tuple[float, float]:
    src = ModelSource(model_dir)
    ids = torch.randint(1, src.config["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = src.hf_model()(input_ids=ids).logits[0].numpy()
    ours = first_row_logits("gguf:F32", gguf_path, ids)
    return float(np.abs(ours - ref).max()), float(np.abs(ref).max())


def test_f32_logits_equal_transformers_on_default_model(default_f32):
    err, scale = _max_logit_error(None, default_f32, seq_len=256)
    # same weights in fp32; llama.cpp sums in a different order (and uses its own exp/rope code)
    assert err < 2e-3 * max(1.0, scale), (err, scale)


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3",
                                  "mixtral", "qwen3_moe"])
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


@pytest.mark.parametrize("gguf_type", ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q5_0", "Q4_K_M", "Q4_1",
                                       "Q4_0", "Q3_K_M", "Q2_K"])
def test_every_type_loads_and_tracks_f32_in_llama_cpp(default_f32, tmp_path, gguf_type):
    path = export(None, gguf_type, tmp_path / f"{gguf_type}.gguf")
    ids = torch.randint(1, 4096, (1, 128), generator=torch.Generator().manual_seed(2))
    ref = first_row_logits("gguf:F32", default_f32, ids)
    got = first_row_logits(f"gguf:{gguf_type}", path, ids)
    agreement = (ref.argmax(-1) == got.argmax(-1)).mean()
    # 16-bit files hold the bf16 weights exactly (F16: within its range); llama.cpp rounds activations
    # to 16 bits for those matmuls, so they agree almost always; 4-5 bit types agree less often.
    floor = 0.98 if gguf_type in ("F16", "BF16", "Q8_0") else 0.5 if gguf_type in ("Q3_K_M", "Q2_K") else 0.7
    assert agreement > floor, agreement


def test_file_type_numbers_are_llama_cpps():
    from quantkit.targets.gguf_mixes import FILE_TYPES as OURS

    for name, file_type in OURS.items():
        constant = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert file_type.ftype == getattr(llama_cpp, constant), name


@pytest.mark.parametrize("name", ["llama-tied", "qwen2", "qwen3", "phi3"])
@pytest.mark.parametrize("gguf_type", ["Q4_0", "Q4_K_M", "Q2_K"])
def test_tied_and_narrow_models_match_llama_cpp(tiny_models, tmp_path, name, gguf_type):
    """128-wide rows fall back (Q4_K -> Q5_0, Q6_K -> Q8_0) and a tied embedding follows the output rule."""
    f32 = export(tiny_models[name], "F32", tmp_path / "f32.gguf")
    ours = tensors(export(tiny_models[name], gguf_type, tmp_path / "ours.gguf"))
    assert_same_tensors(ours, tensors(llama_quantize(f32, tmp_path / "theirs.gguf", gguf_type)))
    if name in ("llama-tied", "qwen3"):  # tied embeddings
        assert ours["token_embd.weight"].tensor_type == GGMLType.Q8_0


@pytest.mark.parametrize("gguf_type", ["Q3_K_M", "Q3_K_L", "Q4_K_S", "Q5_K_M"])
def test_fused_qkv_follows_llama_cpps_rules_in_every_mix(tiny_models, tmp_path, gguf_type):
    """Phi-3's attn_qkv: llama.cpp gives it attn_v's rules (256-wide rows: the k-quant rules themselves apply)."""
    f32 = export(tiny_models["phi3"], "F32", tmp_path / "f32.gguf")
    ours = tensors(export(tiny_models["phi3"], gguf_type, tmp_path / "ours.gguf"))
    assert_same_tensors(ours, tensors(llama_quantize(f32, tmp_path / "theirs.gguf", gguf_type)))


@pytest.mark.parametrize("name,gguf_type", [("mixtral", t) for t in ("Q8_0", "Q4_K_M", "Q3_K_M", "Q3_K_L", "Q2_K")]
                         + [("qwen3_moe", "Q4_K_M")])
def test_experts_stacks_and_rules_match_llama_cpp(tiny_models, tmp_path, name, gguf_type):
    """Each expert's matrices stacked into one 3-D tensor per role, quantized expert by expert; the router
    kept in F32; 8-expert models get llama.cpp's own rules (attn_v / attn_k in Q8_0, attn_output in Q5_K)."""
    f32 = export(tiny_models[name], "F32", tmp_path / "f32.gguf")
    ours = tensors(export(tiny_models[name], gguf_type, tmp_path / "ours.gguf"))
    assert_same_tensors(ours, tensors(llama_quantize(f32, tmp_path / "theirs.gguf", gguf_type)))
    assert ours["blk.0.ffn_gate_inp.weight"].tensor_type == GGMLType.F32
    assert len(ours["blk.1.ffn_down_exps.weight"].shape) == 3
    if name == "mixtral" and gguf_type != "Q8_0":
        assert ours["blk.0.attn_k.weight"].tensor_type == GGMLType.Q8_0


def test_mix_falls_back_for_rows_that_do_not_fit(tiny_models, tmp_path):
    """The tiny model's 128-wide rows fit no 256 super-block: llama.cpp's fallback types, reported."""
    from quantkit.targets.gguf import GGUFTarget

    target = GGUFTarget("Q4_K_M")
    src = ModelSource(tiny_models["llama"])
    planned = target.plan(src, Recipe())
    plan = {t.gguf_name: t.ggml_type.name for t in planned}
    assert plan["blk.0.attn_q.weight"] == "Q5_0" and plan["output.weight"] == "Q8_0"
    q4_k = [n for n in planned.notes if "with rows of 128 do not fit Q4_K's blocks; written as Q5_0" in n]
    assert len(q4_k) == 1 and "token_embd, attn_q x2, attn_k x2" in q4_k[0], planned.notes
    assert any("do not fit Q6_K's blocks; written as Q8_0, as llama.cpp does (attn_v)" in n for n in planned.notes)


OVERRIDES = ((r"attn_v", "Q8_0"), (r"blk\.0\..*", "Q6_K"), (r"ffn_(up|gate)", "Q5_0"))


@pytest.mark.parametrize("pure", [False, True], ids=["rules", "pure"])
def test_tensor_type_overrides_byte_identical_to_llama_quantize(default_f32, tmp_path, pure):
    """--tensor-type (first regex match wins), --token-embedding-type and --output-tensor-type as in llama.cpp."""
    specs = [f"{p}={t.lower()}" for p, t in OVERRIDES]
    ours = tensors(export(None, "Q4_K_M", tmp_path / "ours.gguf", pure=pure, tensor_types=specs,
                          token_embedding_type="Q8_0", output_tensor_type="q5_k"))
    theirs = tensors(llama_quantize(default_f32, tmp_path / "theirs.gguf", "Q4_K_M", pure=pure, overrides=OVERRIDES,
                                    token_embd="Q8_0", output="Q5_K"))
    assert_same_tensors(ours, theirs)
    got = {n: t.tensor_type.name for n, t in ours.items()}
    assert got["blk.0.attn_v.weight"] == got["blk.3.attn_v.weight"] == "Q8_0"  # first match wins over blk.0
    assert got["blk.0.attn_q.weight"] == "Q6_K" and got["blk.2.ffn_up.weight"] == "Q5_0"
    assert got["token_embd.weight"] == "Q8_0" and got["output.weight"] == "Q5_K"
    # Q4_K_M gives ffn_down more bits in the first and last eighth of the layers (and every third between):
    # with 4 layers, blk.3 but not blk.1 (blk.0 is taken by the blk.0 override above)
    assert got["blk.1.ffn_down.weight"] == "Q4_K"
    assert got["blk.3.ffn_down.weight"] == ("Q4_K" if pure else "Q6_K")


def test_overrides_are_reported(tmp_path):
    from quantkit.targets.gguf import GGUFTarget

    target = GGUFTarget("Q4_0")
    planned = target.plan(ModelSource(), Recipe(tensor_types=["attn_v=Q8_0"], output_tensor_type="F16"))
    assert list(planned.notes) == [
        "--tensor-type attn_v=Q8_0: 4 tensors (blk.0.attn_v.weight, blk.1.attn_v.weight, blk.2.attn_v.weight "
        "and 1 more)",
        "--output-tensor-type: 1 tensor (output.weight)"]


@pytest.mark.parametrize("recipe,message", [
    (dict(tensor_types=["atn_v=Q8_0"]), "--tensor-type atn_v=Q8_0 matches no quantizable tensor"),
    (dict(tensor_types=["attn=Q8_0", "attn_v=Q6_K"]), "--tensor-type attn_v=Q6_K decides no tensor"),
    (dict(tensor_types=["attn_norm=Q8_0"]), "matches no quantizable tensor"),  # norms stay F32, as in llama.cpp
])
def test_override_that_cannot_apply_is_refused_before_work(recipe, message):
    from quantkit.errors import QuantkitError

    src, r = ModelSource(), Recipe(**recipe)
    ctx = ExportContext(src, r, quantized_tensor_names(src, r), progress=False)
    with pytest.raises(QuantkitError, match=message.replace(".", r"\.")):
        parse_target("gguf:Q4_0").validate(ctx)


@pytest.mark.parametrize("argv,message", [
    (["--tensor-type", "attn_v=Q9_9"], "--tensor-type 'attn_v=Q9_9': unknown tensor type 'Q9_9'; use one of"),
    (["--tensor-type", "attn_v"], "is not PATTERN=TYPE"),
    (["--tensor-type", "(=Q8_0"], "is not a valid regular expression"),
    (["--output-tensor-type", "IQ2_XS"], "--output-tensor-type: unknown tensor type 'IQ2_XS'"),
])
def test_bad_override_options_exit_2(capsys, tmp_path, argv, message):
    from quantkit.cli import main

    assert main(["ship", "--out", str(tmp_path / "o"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_q2_k_s_types_and_bytes_equal_llama_cpp(default_f32, tmp_path):
    """llama.cpp builds Q2_K_S only with an importance matrix; its types (and the bytes of every tensor that
    does not use one) equal ours. Without an importance matrix quantkit refuses it up front."""
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="gguf:Q2_K_S needs an importance matrix"):
        export(None, "Q2_K_S", tmp_path / "refused.gguf")
    ours = tensors(export(None, "Q2_K_S", tmp_path / "ours.gguf", validate=False))
    needs = {n: np.ones(t.shape[0]) for n, t in ours.items()
             if t.tensor_type == GGMLType.Q2_K and n.startswith("blk.")}
    theirs = tensors(llama_quantize(default_f32, tmp_path / "theirs.gguf", "Q2_K_S", imatrix=needs))
    assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in theirs.items()}
    assert_same_tensors(ours, theirs, [n for n in ours if n not in needs])
    # 2 KV heads for 4 query heads and 4 layers: no GQA or first-eighth rule applies, every block matrix is Q2_K
    assert len(needs) == 4 * 7 and ours["token_embd.weight"].tensor_type == GGMLType.Q2_K


def test_rules_for_grouped_kv_heads_and_70b_size_match_llama_cpp(tmp_path):
    """80 layers with 8 query heads per KV head: llama.cpp's 70B class (attn_v lifted to Q5_K), its GQA >= 4
    rules and its layer fractions of 80 layers. Types only (the tensors are many)."""
    from transformers import LlamaConfig

    from quantkit.targets.gguf import GGUFTarget
    from quantkit_testing.models import TINY, save_tiny

    config = LlamaConfig(**{**TINY, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 80,
                            "num_attention_heads": 8, "num_key_value_heads": 1})
    model = save_tiny(tmp_path / "deep", config)
    f32 = export(model, "F32", tmp_path / "f32.gguf")
    src = ModelSource(model)
    for gguf_type in ("Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M"):
        plan = {t.gguf_name: t.ggml_type for t in GGUFTarget(gguf_type).plan(src, Recipe())}
        imatrix = {n: np.ones(256) for n, t in plan.items() if t == GGMLType.Q2_K and n.startswith("blk.")}
        theirs = tensors(llama_quantize(f32, tmp_path / f"{gguf_type}.gguf", gguf_type, imatrix=imatrix))
        assert plan == {n: t.tensor_type for n, t in theirs.items()}, gguf_type
        (tmp_path / f"{gguf_type}.gguf").unlink()
        # attn_v: Q2_K's GQA >= 4 rule gives Q4_K, Q3_K_S's base is Q3_K; the 70B class lifts both to Q5_K
        if gguf_type in ("Q2_K", "Q2_K_S", "Q3_K_S"):
            assert plan["blk.40.attn_v.weight"] == GGMLType.Q5_K


SPM_BPE = Path(__file__).parent / "data" / "spm_bpe"  # made by tests/data/make_spm_bpe.py
# Llama-2's older tokenizer.json spells the space handling as a normalizer; the newer one as Metaspace
LEGACY_SPACES = {"normalizer": {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    "pre_tokenizer": None}
# Gemma's: spaces become "▁" with no prefix; Gemma 2/3 add a Split on " " that never fires after the normalizer
GEMMA_SPACES = {"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
                "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                                  "invert": False}}
SPACE_RULES = {"normalizer": LEGACY_SPACES, "gemma": GEMMA_SPACES, "gemma-1": {**GEMMA_SPACES, "pre_tokenizer": None}}


@pytest.fixture
def spm_llama(tmp_path) -> Path:
    """A tiny random Llama with a Llama-2-style tokenizer: sentencepiece BPE, byte fallback, "▁" spaces."""
    import shutil

    from transformers import LlamaConfig

    from quantkit_testing.models import TINY, save_tiny

    config = LlamaConfig(**{**TINY, "vocab_size": 1000, "bos_token_id": 1, "eos_token_id": 2})
    path = save_tiny(tmp_path / "spm-llama", config)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(SPM_BPE / name, path / name)
    return path


@pytest.mark.parametrize("spaces", ["metaspace", "normalizer", "gemma", "gemma-1"])
def test_sentencepiece_bpe_tokenizer_tokenizes_like_hf_in_llama_cpp(spm_llama, tmp_path, spaces):
    import json

    from quantkit.targets import gguf_vocab
    from quantkit.targets.gguf import GGUFTarget

    if spaces != "metaspace":
        spec = json.loads((spm_llama / "tokenizer.json").read_text())
        (spm_llama / "tokenizer.json").write_text(json.dumps({**spec, **SPACE_RULES[spaces]}))
        # transformers' LlamaTokenizer class sets its own space rules; the generic class runs the file's
        config = json.loads((spm_llama / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (spm_llama / "tokenizer_config.json").write_text(json.dumps(config))
    vocab = gguf_vocab.read_vocab(spm_llama, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    prefix = not spaces.startswith("gemma")  # Gemma adds no "▁" before the text
    assert (vocab.model, vocab.pre, vocab.add_space_prefix, vocab.add_bos) == ("llama", "default", prefix, True)
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id) == (1, 2, 0)
    assert vocab.token_types[vocab.tokens.index("<0x0A>")] == gguf_vocab.TOKEN_BYTE
    assert vocab.token_types[:3] == [gguf_vocab.TOKEN_UNKNOWN, gguf_vocab.TOKEN_CONTROL, gguf_vocab.TOKEN_CONTROL]
    path = export(spm_llama, "Q8_0", tmp_path / "m.gguf")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.model"].contents() == "llama"
    docs, size = [], 0
    for doc in load_documents("builtin", "eval"):  # a few kB of Python source: indentation, digits, symbols
        docs.append(doc[:2000])
        size += len(docs[-1])
        if size > 8000:
            break
    docs += ["tabs\tand\n\n\nthree newlines,  two spaces", "naïve café ünïcode 東京 😀 — “quotes”",
             "digits 1234567890 and 3.14159", "x"]
    if not prefix:  # no "▁" is prepended, so leading spaces are plain text (see the sentencepiece test for others)
        docs += [" leading space", "  two leading"]
    check = GGUFTarget("F32").verify_tokenizer(path, ModelSource(spm_llama).tokenizer(), docs)
    assert check["tokens"] > 2000 and check["mismatched_texts"] == 0, check


def test_sentencepiece_bpe_tokenizer_tokenizes_like_sentencepiece_in_llama_cpp(spm_llama, tmp_path):
    """Also for a text that starts with a space, where transformers' Llama tokenizer (Metaspace, prepend_scheme
    "first") adds no "▁" but sentencepiece, which trained the vocabulary, does, and llama.cpp follows it."""
    from quantkit.targets.gguf import load_llama

    spm = require("sentencepiece")  # the reference tokenizer (dev extra)
    processor = spm.SentencePieceProcessor(model_file=str(spm_llama / "tokenizer.model"))
    llm = load_llama(export(spm_llama, "F32", tmp_path / "m.gguf"), 64)
    texts = [doc[:3000] for doc in load_documents("builtin", "eval")[:3]]
    try:
        for text in texts + ["  two leading spaces", " ", "\tindented", "naïve 東京 😀"]:
            assert list(llm.tokenize(text.encode(), add_bos=False, special=False)) == processor.encode(text), text
    finally:
        llm.close()


def test_sentencepiece_tokenizer_with_unknown_space_rule_is_refused(spm_llama, tmp_path):
    import json

    from quantkit.errors import QuantkitError

    spec = json.loads((spm_llama / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["split"] = True  # HF would split words apart; llama.cpp's "llama" tokenizer does not
    (spm_llama / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(QuantkitError, match="cannot identify the tokenizer's pre-tokenizer"):
        export(spm_llama, "F32", tmp_path / "m.gguf")
