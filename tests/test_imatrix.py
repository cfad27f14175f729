"""Importance matrices: the weighted GGUF quantizers against ggml itself, llama.cpp's imatrix files,
and the --imatrix plumbing."""

import struct

import gguf
import numpy as np
import pytest
import torch

from quantkit.calibrate import collect_statistics
from quantkit.data import make_samples
from quantkit.errors import QuantkitError
from quantkit.grids import GGUF_GRIDS
from quantkit.grids.ggml_lib import use_engine
from quantkit.imatrix import (
    ImatrixEntry,
    ImportanceMatrix,
    from_statistics,
    gguf_weight_names,
    load_imatrix_option,
    read_imatrix,
    write_imatrix,
)
from quantkit.methods import RoundToNearest
from quantkit.model import ModelSource
from quantkit.recipe import Recipe
from quantkit_testing.ggml_reference import ggml_quantize
from quantkit_testing.helpers import edge_weights
from quantkit_testing.runtimes import require

llama_cpp = require("llama_cpp")  # llama.cpp's quantizer, the reference for the weighted types
WEIGHTED_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
# one linear of each shape, from different layers: (256, 256), (128, 256), (768, 256), (256, 768)
SAMPLE_WEIGHTS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                  "model.layers.2.mlp.gate_proj.weight", "model.layers.3.mlp.down_proj.weight"]


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return ModelSource()


@pytest.fixture(scope="module")
def calib_imatrix(source) -> ImportanceMatrix:
    """The embedded model's importance matrix from 4 x 512 tokens of its calibration split."""
    samples = make_samples(source.tokenizer(), "builtin", "calib", 4, 512)
    linears = [n for i in range(source.n_layers) for n in source.arch.linear_weights(i)] + [source.arch.lm_head]
    stats = collect_statistics(source.hf_model(), samples, linears, gram=False)
    return from_statistics(stats, gguf_weight_names(source.arch, source.n_layers), samples.source, 512, 4)


def _importance(source, imatrix: ImportanceMatrix, hf_name: str) -> torch.Tensor:
    return torch.from_numpy(imatrix.values(gguf_weight_names(source.arch, source.n_layers)[hf_name]))


@pytest.fixture
def torch_engine():
    """The torch reference grids, not ggml's library, quantize inside the test."""
    with use_engine("torch"):
        yield


@pytest.mark.usefixtures("torch_engine")
@pytest.mark.parametrize("gguf_type", WEIGHTED_TYPES)
def test_weighted_quantizers_byte_identical_to_ggml(source, calib_imatrix, gguf_type):
    """ggml_quantize_chunk with the imatrix (llama.cpp's quantize_row_*_impl paths) writes our bytes."""
    grid = GGUF_GRIDS[gguf_type]
    for name in SAMPLE_WEIGHTS:
        w = source.load(name).float()
        importance = _importance(source, calib_imatrix, name)
        ours = grid.to_bytes(RoundToNearest().quantize_weight(w, grid, importance=importance))
        theirs = ggml_quantize(gguf_type, w.numpy(), importance.numpy())
        assert np.array_equal(ours, theirs), name
        # the imatrix changes the result: it is not silently ignored
        assert not np.array_equal(theirs, ggml_quantize(gguf_type, w.numpy())), name


@pytest.mark.usefixtures("torch_engine")
@pytest.mark.parametrize("gguf_type", sorted(GGUF_GRIDS))
@pytest.mark.parametrize("weighted", [False, True])
def test_zero_blocks_and_dead_columns_match_ggml(gguf_type, weighted):
    """Degenerate blocks take ggml's special cases (zeroed scale bytes, L = 0), with and without imatrix."""
    w, importance = edge_weights()
    grid = GGUF_GRIDS[gguf_type]
    ours = grid.to_bytes(RoundToNearest().quantize_weight(w, grid, importance=importance if weighted else None))
    theirs = ggml_quantize(gguf_type, w.numpy(), importance.numpy() if weighted else None)
    for row in range(w.shape[0]):
        assert np.array_equal(ours[row], theirs[row]), row
    decoded = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType[gguf_type])
    assert np.all(decoded[4] == 0) and np.all(decoded[0, :256] == 0)


@pytest.mark.parametrize("gguf_type", WEIGHTED_TYPES)
def test_imatrix_lowers_the_activation_weighted_error(source, calib_imatrix, gguf_type):
    """What the imatrix is for: the error on the outputs, sum_j E[x_j^2] (W - Q)_ij^2, goes down."""
    grid = GGUF_GRIDS[gguf_type]
    plain, weighted = 0.0, 0.0
    for name in SAMPLE_WEIGHTS:
        w = source.load(name).float()
        importance = _importance(source, calib_imatrix, name)
        for use, bucket in ((None, "plain"), (importance, "weighted")):
            err = ((RoundToNearest().quantize_weight(w, grid, importance=use).dequantize() - w) ** 2 * importance)
            if bucket == "plain":
                plain += float(err.sum())
            else:
                weighted += float(err.sum())
    assert weighted < 0.97 * plain, (weighted, plain)


# ---- files --------------------------------------------------------------------------------------


def _small_matrix() -> ImportanceMatrix:
    return ImportanceMatrix({"blk.0.attn_q.weight": ImatrixEntry(np.linspace(1, 9, 256, dtype=np.float32), 1536),
                             "blk.0.ffn_down.weight": ImatrixEntry(np.full(768, 0.5, dtype=np.float32), 1536)},
                            ["calib.txt"], 3, 512)


def test_gguf_file_has_llama_imatrix_layout(tmp_path):
    """Tensor names, ggml shapes (ne), types and keys as llama-imatrix writes them (tools/imatrix)."""
    path = write_imatrix(_small_matrix(), tmp_path / "imatrix.gguf")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                             "blk.0.ffn_down.weight.in_sum2", "blk.0.ffn_down.weight.counts"]
    assert tensors["blk.0.attn_q.weight.in_sum2"].shape.tolist() == [256, 1]  # ne = [n_in, n_mat]
    assert tensors["blk.0.attn_q.weight.counts"].shape.tolist() == [1, 1]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    assert float(tensors["blk.0.ffn_down.weight.counts"].data.reshape(-1)[0]) == 1536.0
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert bytes(reader.fields["general.type"].parts[-1]) == b"imatrix"


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_round_trip_keeps_the_importance(tmp_path, suffix):
    original = _small_matrix()
    back = read_imatrix(write_imatrix(original, tmp_path / f"m{suffix}"))
    assert back.legacy == (suffix == ".dat")
    assert back.entries.keys() == original.entries.keys()
    for name in original.entries:
        np.testing.assert_allclose(back.values(name), original.values(name), rtol=2e-7)
    assert back.datasets == ["calib.txt"] and back.chunk_count == 3
    again = read_imatrix(write_imatrix(back, tmp_path / f"again{suffix}"))  # what we read, we write unchanged
    for name in original.entries:
        assert np.array_equal(again.values(name), back.values(name))


def test_legacy_file_by_hand(tmp_path):
    """A .dat file laid out as llama-imatrix's save_imatrix_legacy: values are mean * ncall."""
    name = b"blk.3.ffn_up.weight"
    raw = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 4, 3)
    raw += np.array([2.0, 4.0, 8.0], dtype="<f4").tobytes() + struct.pack("<i", 4) + struct.pack("<i", 5) + b"a.txt"
    (tmp_path / "m.dat").write_bytes(raw)
    m = read_imatrix(tmp_path / "m.dat")
    assert m.values("blk.3.ffn_up.weight").tolist() == [0.5, 1.0, 2.0]
    assert m.chunk_count == 4 and m.datasets == ["a.txt"]
    assert write_imatrix(m, tmp_path / "out.dat").read_bytes() == raw


def test_legacy_file_from_collected_counts(tmp_path):
    """Ours in .dat: ncall = ceil(tokens / chunk size) and values = mean * ncall, as llama-imatrix writes."""
    m = ImportanceMatrix({"blk.0.attn_k.weight": ImatrixEntry(np.array([3.0, 6.0], np.float32), 1000)}, ["x"], 2, 512)
    raw = write_imatrix(m, tmp_path / "m.dat").read_bytes()
    name = b"blk.0.attn_k.weight"
    ncall, nval = struct.unpack_from("<ii", raw, 8 + len(name))
    assert (ncall, nval) == (2, 2)
    values = np.frombuffer(raw, "<f4", count=2, offset=16 + len(name))
    assert values.tolist() == [np.float32(np.float32(3.0) / 1000) * 2, np.float32(np.float32(6.0) / 1000) * 2]


def test_not_an_imatrix_file(tmp_path):
    (tmp_path / "x.dat").write_bytes(b"\x02\x00")
    with pytest.raises(QuantkitError, match="is not a llama.cpp imatrix file"):
        read_imatrix(tmp_path / "x.dat")


def test_file_for_another_model_is_refused(source, calib_imatrix, tmp_path):
    names = [n for i in range(source.n_layers) for n in source.arch.linear_weights(i)]
    partial = ImportanceMatrix(dict(calib_imatrix.entries), [], 1, 512)
    del partial.entries["blk.2.ffn_up.weight"]
    with pytest.raises(QuantkitError, match=r"no entry for blk\.2\.ffn_up\.weight"):
        load_imatrix_option(str(write_imatrix(partial, tmp_path / "partial.gguf")), source, names)
    wide = ImportanceMatrix(dict(calib_imatrix.entries), [], 1, 512)
    wide.entries["blk.0.attn_q.weight"] = ImatrixEntry(np.ones(512, np.float32), 10)
    with pytest.raises(QuantkitError, match=r"512 columns for blk\.0\.attn_q\.weight, the model has 256"):
        load_imatrix_option(str(write_imatrix(wide, tmp_path / "wide.dat")), source, names)
    no_output = ImportanceMatrix(dict(calib_imatrix.entries), [], 1, 512)
    del no_output.entries["output.weight"]  # llama-imatrix skips output.weight by default: accepted
    path = write_imatrix(no_output, tmp_path / "ok.gguf")
    assert load_imatrix_option(str(path), source, [*names, source.arch.lm_head]).entries.keys() == \
        no_output.entries.keys()


def test_cli_option_reaches_the_recipe():
    from quantkit.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["ship"]).imatrix == "none"
    assert parser.parse_args(["ship", "--imatrix", "calib"]).imatrix == "calib"
    assert parser.parse_args(["ship", "--imatrix", "m.dat"]).imatrix == "m.dat"


def test_recipe_refuses_imatrix_with_other_methods_and_missing_files(tmp_path):
    with pytest.raises(QuantkitError, match="--imatrix weighs round-to-nearest"):
        Recipe(method="gptq", imatrix="calib").validate()
    with pytest.raises(QuantkitError, match="neither none, calib nor an existing file"):
        Recipe(imatrix=str(tmp_path / "missing.gguf")).validate()
    Recipe(imatrix="calib").validate()


# ---- the whole pipeline against llama.cpp's quantizer ----------------------------------------------


def _llama_imatrix(imatrix: ImportanceMatrix):
    """llama_model_quantize's imatrix parameter: name -> importance values, null-terminated."""
    values = {name: np.ascontiguousarray(imatrix.values(name), dtype=np.float32) for name in imatrix.entries}
    array = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    for i, (name, v) in enumerate(values.items()):
        array[i].name = name.encode()
        array[i].data = v.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
        array[i].size = v.size
    return array, values  # keep the buffers alive while llama.cpp reads them


def test_ship_with_collected_imatrix_equals_llama_quantize(tmp_path):
    """quantkit ship --imatrix calib writes imatrix.gguf; llama.cpp's quantizer given that imatrix makes
    the same bytes from our F32 file, tensor by tensor."""
    import quantkit

    common = dict(calib_samples=2, eval_samples=2, seq_len=128, progress=False, verbose=False)
    result = quantkit.ship(targets=["gguf:F32", "gguf:Q4_K_M", "gguf:Q4_0", "gguf:IQ4_XS"], out=tmp_path / "out",
                           imatrix="calib",
                           max_ppl_increase_pct=100.0, max_kld=10.0, min_top1=0.0, **common)
    paths = {a.target: tmp_path / "out" / a.path for a in result.artifacts}
    entry = result.manifest["data"]["imatrix"]
    assert entry["path"] == "imatrix.gguf" and entry["entries"] == 29  # 28 block linears + output
    imatrix = read_imatrix(tmp_path / "out" / "imatrix.gguf")
    assert imatrix.chunk_size == 128 and imatrix.chunk_count == 2
    for gguf_type in ("Q4_K_M", "Q4_0", "IQ4_XS"):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
        array, _keep = _llama_imatrix(imatrix)
        params.imatrix = llama_cpp.ctypes.cast(array, llama_cpp.ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        theirs_path = tmp_path / f"theirs-{gguf_type}.gguf"
        assert llama_cpp.llama_model_quantize(str(paths["gguf:F32"]).encode(), str(theirs_path).encode(), params) == 0
        ours = {t.name: t for t in gguf.GGUFReader(paths[f"gguf:{gguf_type}"]).tensors}
        theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
        compared = [n for n, t in ours.items() if t.tensor_type.name in GGUF_GRIDS]
        assert len(compared) >= 28
        for name in compared:
            assert ours[name].tensor_type == theirs[name].tensor_type, name
            assert ours[name].data.tobytes() == theirs[name].data.tobytes(), name
    # the file we wrote, passed back as --imatrix PATH, gives the same artifact
    again = quantkit.ship(targets=["gguf:Q4_0"], out=tmp_path / "again", imatrix=str(tmp_path / "out" / "imatrix.gguf"),
                          max_ppl_increase_pct=100.0, max_kld=10.0, min_top1=0.0, **common)
    assert again.manifest["data"]["imatrix"]["sha256"] == entry["sha256"]
    assert not (tmp_path / "again" / "imatrix.gguf").exists()
    assert (tmp_path / "again" / again.artifacts[0].path).read_bytes() == paths["gguf:Q4_0"].read_bytes()
