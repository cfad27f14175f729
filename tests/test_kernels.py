"""Triton kernels under TRITON_INTERPRET=1 against their plain-torch references, QuantLinear, and
quantkit's own runtime for hf-gptq / hf-awq folders."""

from pathlib import Path

import pytest
import torch

from quantkit.calibrate import LinearStats
from quantkit.grids import IntGrid
from quantkit.kernels import reference
from quantkit.kernels import w4a16 as tk
from quantkit.kernels.quant_linear import QuantLinear
from quantkit.methods import RoundToNearest
from quantkit.methods.gptq import GPTQConfig, gptq_quantize
from quantkit.targets.hf_awq import awq_tensors
from quantkit.targets.hf_gptq import gptq_tensors

N, K, GROUP = 200, 384, 128  # N and K are not multiples of the 64-wide blocks: masking is exercised


def packed(layout: str, act_order: bool = False, seed: int = 0, bits: int = 4, n: int = N) -> dict[str, torch.Tensor]:
    qw = quantized(act_order, seed, bits, n)
    t = gptq_tensors(qw) if layout == "gptq" else awq_tensors(qw)
    t.setdefault("g_idx", None)
    return t


def quantized(act_order: bool = False, seed: int = 0, bits: int = 4, n: int = N):
    """The QuantizedWeight ``packed`` packs: its decode is the reference the packed kernels must reproduce."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, K, generator=g) * 0.05
    grid = IntGrid(bits=bits, group_size=GROUP, symmetric=False, fp16_scales=True, min_zero=1)
    if act_order:
        x = torch.randn(256, K, generator=g) * torch.linspace(0.1, 3, K)
        stats = LinearStats(torch.zeros(K, K, dtype=torch.float64))
        stats.add(x)
        return gptq_quantize(w, stats.gram, grid, GPTQConfig(act_order=True))
    return RoundToNearest().quantize_weight(w, grid)


CASES = [("gptq", False), ("gptq", True), ("awq", False)]


@pytest.mark.parametrize("layout,act_order", CASES)
def test_dequantize_is_exact(layout, act_order):
    t = packed(layout, act_order)
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"], layout, GROUP)
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(tk.dequantize(*args, dtype), reference.dequantize(*args, dtype))


# Tolerances: fp32 differs only by summation order (~1e-6 relative). fp16 / bf16 results are
# rounded to the output dtype once (half an ulp: 2^-11 / 2^-8 relative), and the interpreter's
# fp32 -> bf16 cast truncates instead of rounding, so bf16 gets two ulps.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2 * 2**-8}


@pytest.mark.parametrize("layout,act_order", CASES)
@pytest.mark.parametrize("m", [1, 5, 40, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_w4a16_matmul_matches_reference(layout, act_order, m, dtype):
    t = packed(layout, act_order)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).to(dtype)
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"], layout, GROUP)
    ours = tk.w4a16_matmul(x, *args)
    ref = reference.w4a16_matmul(x, *args)
    assert ours.shape == (m, N) and ours.dtype == dtype
    scale = ref.float().abs().max().item()
    assert (ours.float() - ref.float()).abs().max().item() <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("bits", [2, 8])
def test_other_gptq_bit_widths(bits):
    t = packed("gptq", bits=bits, n=208)  # 2-bit zeros pack 16 outputs per word
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"], "gptq", GROUP)
    assert torch.equal(tk.dequantize(*args, torch.float32, bits=bits),
                       reference.dequantize(*args, torch.float32, bits))
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(bits))
    torch.testing.assert_close(tk.w4a16_matmul(x, *args, bits=bits), reference.w4a16_matmul(x, *args, bits),
                               rtol=1e-5, atol=1e-5)  # fp32: summation order only
    with pytest.raises(ValueError, match="cannot hold"):
        tk.dequantize(*args[:4], "awq", GROUP, bits=bits)


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_split_k_sums_to_the_same_result(split_k):
    t = packed("gptq")
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(7))
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"], "gptq", GROUP)
    config = tk.GemmConfig(16, 64, 64, split_k=split_k)
    torch.testing.assert_close(tk.w4a16_matmul(x, *args, config=config), reference.w4a16_matmul(x, *args),
                               rtol=1e-5, atol=1e-5)  # fp32; atomic adds change only summation order


def test_batched_input_keeps_leading_dims():
    t = packed("awq")
    x = torch.randn(2, 3, K)
    out = tk.w4a16_matmul(x, t["qweight"], t["qzeros"], t["scales"], None, "awq", GROUP)
    assert out.shape == (2, 3, N)


def test_wrapper_checks_inputs():
    t = packed("gptq")
    with pytest.raises(ValueError, match="needs g_idx"):
        tk.w4a16_matmul(torch.randn(1, K), t["qweight"], t["qzeros"], t["scales"], None, "gptq", GROUP)
    with pytest.raises(ValueError, match="features"):
        tk.w4a16_matmul(torch.randn(1, K + 8), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], "gptq", GROUP)
    with pytest.raises(ValueError, match="unknown layout"):
        tk.dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], "exl2", GROUP)


@pytest.mark.parametrize("layout,act_order", CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quant_linear_equals_dequantized_matmul(layout, act_order, backend):
    t = packed(layout, act_order)
    bias = torch.randn(N)
    layer = QuantLinear(K, N, layout, GROUP, {k: v for k, v in t.items() if v is not None}, bias, backend)
    x = torch.randn(4, K)
    # the weight as the grid decoded it before packing: the packed layout and the kernels must reproduce it
    expected = x @ quantized(act_order).dequantize().T + bias
    # fp32; fp16 scales in the checkpoint equal the grid's (fitted on fp16-rounded scales), so only the
    # summation order differs
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_dry_run_of_the_gpu_benchmark(capsys):
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"  # wherever pytest runs from
    out = subprocess.run([sys.executable, str(script), "--dry-run", "--json"], check=True,
                         capture_output=True, text=True).stdout
    plan = json.loads(out)
    assert {(r["K"], r["N"]) for r in plan["rows"]} == {(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)}
    assert {r["M"] for r in plan["rows"]} == {1, 4, 16, 64, 256, 2048}
    assert all(r["checked"] for r in plan["rows"])


@pytest.fixture(scope="module")
def shipped_with_quantkit_runtime(tmp_path_factory):
    import quantkit

    out = tmp_path_factory.mktemp("qk-runtime")
    gptq = quantkit.ship(targets=["hf-gptq"], out=out / "gptq", method="gptq", act_order=True, scheme="asym",
                         runtime="quantkit", eval_samples=2, calib_samples=4, seq_len=128)
    awq = quantkit.ship(targets=["hf-awq"], out=out / "awq", method="awq", scheme="asym", runtime="quantkit",
                        eval_samples=2, calib_samples=4, seq_len=128)
    return [gptq, awq]


def test_quantkit_runtime_checks_hf_folders(shipped_with_quantkit_runtime):
    """quantkit's runtime computes what transformers + gptqmodel (the loader vLLM users rely on) compute
    from the same folder."""
    from quantkit.kernels.quant_linear import load_quantized_model
    from quantkit.targets.hf_checkpoint import hf_logits

    ids = torch.randint(1, 4096, (1, 64), generator=torch.Generator().manual_seed(3))
    for result in shipped_with_quantkit_runtime:
        art = result.artifacts[0]
        assert result.ok and art.runtime["name"].startswith("quantkit QuantLinear")
        folder = result.out_dir / art.path
        model = load_quantized_model(folder)
        assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
        with torch.no_grad():
            ours = model(input_ids=ids).logits[0]
        theirs = torch.from_numpy(next(iter(hf_logits(folder, ids, progress=False))))
        # gptqmodel decodes the same integers with fp16 arithmetic in places and sums in another order
        # (up to 0.081 on logits of 16 measured for its AWQ path): 1 % of the largest logit
        assert (ours - theirs).abs().max() < 1e-2 * ours.abs().max(), art.target
        assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.95


def test_triton_path_through_a_loaded_model(shipped_with_quantkit_runtime):
    from quantkit.kernels.quant_linear import load_quantized_model

    result = shipped_with_quantkit_runtime[0]
    folder = result.out_dir / result.artifacts[0].path
    ids = torch.randint(1, 4096, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch_logits = load_quantized_model(folder, backend="torch")(input_ids=ids).logits
        triton_logits = load_quantized_model(folder, backend="triton")(input_ids=ids).logits
    # fp32 throughout; the kernel sums K in 64-wide tiles, the reference in one matmul
    torch.testing.assert_close(triton_logits, torch_logits, rtol=1e-4, atol=1e-4)


def test_per_token_quantize_matches_reference():
    from quantkit.kernels import w8a8

    x = torch.randn(37, 300, generator=torch.Generator().manual_seed(11)) * 3  # 300: not a block multiple
    x[5] = 0.0  # an all-zero token keeps scale 1
    q, s = w8a8.quantize_per_token(x)
    q_ref, s_ref = w8a8.quantize_per_token_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)  # same fp32 ops, same rounding rule


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_w8a8_matmul_matches_reference(dtype):
    from quantkit.kernels import w8a8

    g = torch.Generator().manual_seed(12)
    xq, xs = w8a8.quantize_per_token_reference(torch.randn(37, 300, generator=g))
    wq, ws = w8a8.quantize_per_token_reference(torch.randn(70, 300, generator=g))  # per-channel weight scales
    ours = w8a8.w8a8_matmul(xq, xs, wq, ws, dtype)
    ref = w8a8.w8a8_matmul_reference(xq, xs, wq, ws, dtype)
    # the int32 accumulation is exact; only the final rounding to the output dtype can differ
    # (the interpreter truncates fp32 -> bf16: up to one ulp, 2^-7 relative)
    ulp = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    assert (ours.float() - ref.float()).abs().max().item() <= ulp * ref.float().abs().max().item()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_groupwise_quantize_equals_round_to_nearest(bits, symmetric):
    from quantkit.kernels.quantize import quantize_groupwise

    w = torch.randn(70, 256, generator=torch.Generator().manual_seed(bits)) * 0.1  # 70 rows: a partial block
    w[3, :32] = 0.0
    grid = IntGrid(bits=bits, group_size=32, symmetric=symmetric, min_zero=0 if symmetric else 1)
    ours = quantize_groupwise(w, grid)
    ref = RoundToNearest().quantize_weight(w, grid)
    assert torch.equal(ours.codes, ref.codes)
    assert torch.equal(ours.params.scale, ref.params.scale)
    if not symmetric:
        assert torch.equal(ours.params.zero, ref.params.zero)
