"""`quantkit inspect` on a GGUF file."""

import json

from quantkit.cli import main
from quantkit_testing.helpers import export


def test_inspect_reports_types_and_bits(tmp_path, capsys):
    path = export(None, "Q4_0", tmp_path / "m.gguf")
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["general.architecture"] == "llama"
    assert info["metadata"]["llama.attention.head_count_kv"] == 2
    assert info["metadata"]["tokenizer.ggml.pre"] == "gpt-2"
    # llama.cpp's Q4_0 file type: every matrix Q4_0 (token embedding included) but the output, in Q6_K
    assert info["by_type"]["Q4_0"]["tensors"] == 29
    assert info["by_type"]["Q4_0"]["bits_per_weight"] == 4.5
    assert set(info["by_type"]) == {"F32", "Q4_0", "Q6_K"}
    assert info["tensor_count"] == 39

    assert main(["inspect", str(path), "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "blk.0.attn_q.weight" in text and "4.500 bpw" in text


def test_inspect_bad_file(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert main(["inspect", str(bad)]) == 2
    assert "not a readable GGUF file" in capsys.readouterr().err


def test_inspect_hf_checkpoint_folder(tmp_path, capsys):
    import quantkit

    result = quantkit.ship(targets=["hf-gptq"], out=tmp_path / "o", eval_samples=1, seq_len=64)
    folder = result.out_dir / result.artifacts[0].path
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantization_config"]["quant_method"] == "gptq"
    assert info["quantized_linears"] == 28
    # 4-bit codes + fp16 scale and 4-bit zero per 128 weights + an int32 g_idx entry per input column
    assert 4.15 < info["quantized_bits_per_weight"] < 4.3
    assert main(["inspect", str(folder)]) == 0
    assert "quantized linears: 28" in capsys.readouterr().out
