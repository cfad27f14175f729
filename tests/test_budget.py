"""Mixed precision under a size budget: the allocation against an exhaustive search, the file against its
budget, llama.cpp loading it, and budgets out of reach refused with the reachable range."""

from __future__ import annotations

import itertools
import json
import random
import re

import gguf
import pytest

import quantkit
from quantkit.budget import Option, allocate, parse_size
from quantkit.cli import main
from quantkit.errors import QuantkitError


def brute_force(options: dict[str, list[Option]], budget: int) -> float:
    """The least summed error of any choice within ``budget`` (every combination tried)."""
    names = sorted(options)
    best = float("inf")
    for combo in itertools.product(*(options[n] for n in names)):
        if sum(o.nbytes for o in combo) <= budget:
            best = min(best, sum(o.error for o in combo))
    return best


def test_allocation_by_hand():
    """a's error falls 90 for 10 bytes, b's 5: with 10 spare bytes a is upgraded, not b."""
    options = {"a": [Option("Q2_K", 10, 100.0), Option("Q4_K", 20, 10.0)],
               "b": [Option("Q2_K", 10, 20.0), Option("Q4_K", 20, 15.0)]}
    chosen = allocate(options, 30)
    assert chosen.types == {"a": "Q4_K", "b": "Q2_K"} and chosen.nbytes == 30 and chosen.predicted_error == 30.0
    assert allocate(options, 40).types == {"a": "Q4_K", "b": "Q4_K"}
    assert chosen.reachable == (20, 40)


def test_a_dominated_candidate_is_never_chosen():
    """IQ4_XS larger and worse than Q4_K on this matrix: never picked, whatever the budget."""
    options = {"a": [Option("Q4_K", 20, 10.0), Option("IQ4_XS", 21, 12.0), Option("Q5_K", 30, 3.0)]}
    assert {allocate(options, b).types["a"] for b in range(20, 31)} == {"Q4_K", "Q5_K"}


def exact_optimum(options: dict[str, list[Option]], budget: int) -> float:
    """The least summed error within ``budget``: a dynamic program over every byte count (exact; the
    independent reference for the allocation)."""
    import numpy as np

    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    for opts in options.values():
        new = np.full(budget + 1, np.inf)
        for o in opts:
            if o.nbytes <= budget:
                new[o.nbytes:] = np.minimum(new[o.nbytes:], best[: budget + 1 - o.nbytes] + o.error)
        best = new
    return float(best.min())


def random_options(rng: random.Random, n: int) -> dict[str, list[Option]]:
    """Frontiers shaped like real ones: error roughly halving per added bit, sizes varying per matrix."""
    options = {}
    for k in range(n):
        size, error = rng.randint(50, 200), rng.uniform(1, 100)
        opts = []
        for type_name, bits in (("Q2_K", 2.6), ("Q3_K", 3.4), ("Q4_K", 4.5), ("Q5_K", 5.5), ("Q6_K", 6.6)):
            opts.append(Option(type_name, int(size * bits), error * 2 ** (-bits) * rng.uniform(0.8, 1.2)))
        options[f"m{k:02d}"] = opts
    return options


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("n", [5, 40])
def test_allocation_is_within_budget_and_near_the_exact_optimum(seed, n):
    rng = random.Random(seed)
    options = random_options(rng, n)
    low = sum(min(o.nbytes for o in v) for v in options.values())
    high = sum(max(o.nbytes for o in v) for v in options.values())
    budget = rng.randint(low, high)
    chosen = allocate(options, budget)
    assert chosen.nbytes <= budget
    # with few matrices a single step is a large part of the budget: the Lagrangian choice and its trades can
    # stay a few percent off there; with tens of matrices (a real model has 28 to 224) within 1 %
    assert chosen.predicted_error <= (1.05 if n == 5 else 1.01) * exact_optimum(options, budget)
    if n == 5:  # the dynamic program agrees with trying every combination
        assert exact_optimum(options, budget) == pytest.approx(brute_force(options, budget))


def test_sizes_parse_with_units():
    assert parse_size("90MB") == 90_000_000 and parse_size("1.5GiB") == 3 * 2**29 and parse_size("123") == 123
    with pytest.raises(QuantkitError, match="is not a size"):
        parse_size("ninety")


def ship_budget(tmp_path, name: str, **options):
    return quantkit.ship(targets=["gguf:Q4_K_M"], out=tmp_path / name, imatrix="calib", calib_samples=8,
                         eval_samples=4, seq_len=128, max_kld=10.0, max_ppl_increase_pct=1000.0, min_top1=0.0,
                         **options)


def test_budgeted_files_fit_load_in_llama_cpp_and_lose_less_with_more_bytes(tmp_path):
    """Three budgets on the embedded model: each file is at most its --max-size, its tensors have the
    allocated types (read back by gguf-py), llama.cpp loads and scores it, and a bigger budget gives a lower
    predicted error and a lower KL divergence measured in llama.cpp."""
    results = []
    for size in ("2.7MB", "3.2MB", "4.2MB"):
        result = ship_budget(tmp_path, size, max_size=size)
        artifact = result.artifacts[0]
        path = tmp_path / size / artifact.path
        assert artifact.path == f"model-Q4_K_M-{size}.gguf"
        assert path.stat().st_size <= parse_size(size) and path.stat().st_size == artifact.budget["bytes"]
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert all(types[n] == t for n, t in artifact.budget["types"].items())
        assert len(artifact.budget["types"]) == 28 and (tmp_path / size / artifact.budget["plot"]).is_file()
        assert artifact.metrics["kld"] is not None  # scored in llama.cpp
        results.append(artifact)
    errors = [a.budget["predicted_error"] for a in results]
    klds = [a.metrics["kld"] for a in results]
    assert errors[0] > errors[1] > errors[2] and klds[0] > klds[1] > klds[2], (errors, klds)
    manifest = json.loads((tmp_path / "4.2MB" / "manifest.json").read_text())
    assert manifest["artifacts"][0]["budget"]["counts"] and manifest["recipe"]["max_size"] == "4.2MB"


def test_budget_with_gptq_quantizes_the_mixed_types_in_one_pass(tmp_path):
    """GPTQ under a budget: the pass runs on the allocation's grids (IQ4 and k-quants mixed), and llama.cpp
    scores the file."""
    result = quantkit.ship(targets=["gguf:Q4_K_M"], out=tmp_path / "g", method="gptq", target_bpw=4.8,
                           calib_samples=8, eval_samples=4, seq_len=128, max_kld=10.0, max_ppl_increase_pct=1000.0,
                           min_top1=0.0)
    artifact = result.artifacts[0]
    assert len(set(artifact.budget["types"].values())) > 1 and abs(artifact.bits_per_weight - 4.8) < 0.05
    assert artifact.metrics["kld"] < 0.2


@pytest.mark.parametrize("flag,value,message", [
    ("--target-bpw", "1.6", r"--target-bpw 1.6 is outside what gguf:Q4_K_M can reach for this model: \d\.\d+ to "),
    ("--max-size", "1GB", r"--max-size 1GB is outside what gguf:Q4_K_M can reach for this model: \d+ to \d+ bytes"),
    ("--target-bpw", "40", r"--target-bpw 40.0 is out of range"),
    ("--max-size", "lots", r"is not a size"),
    ("--target-bpw", "4.5 --targets hf-awq", r"hf-awq cannot take a budget"),
    ("--target-bpw", "9 --targets hf-gptq", r"--target-bpw 9.0 is outside what hf-gptq can reach for this model: "
                                            r"2\.\d+ to 8\.\d+ bits per weight"),
])
def test_a_budget_out_of_reach_is_refused_with_the_range(tmp_path, capsys, flag, value, message):
    argv = ["ship", "--targets", "gguf:Q4_K_M", flag, *value.split(), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_hf_gptq_budget_gives_modules_their_own_bits_and_gptqmodel_reads_them(tmp_path):
    """GPTQ on the embedded model under a weight-files budget: the folder mixes widths and group sizes named by
    GPTQModel's ``dynamic``, fits its --max-size, and gptqmodel's loader (the checking runtime) computes the logits
    of the weights our packing reference decodes module by module; transformers' own GPTQ loading, which ignores
    ``dynamic``, refuses the folder rather than misreading it."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from quantkit.data import make_samples
    from quantkit.kernels.quant_linear import load_quantized_model
    from quantkit.model import ModelSource
    from quantkit.targets.hf_checkpoint import hf_logits
    from quantkit_testing.helpers import decoded_reference

    result = quantkit.ship(targets=["hf-gptq"], out=tmp_path / "o", method="gptq", max_size="6.2MB", group_size=64,
                           calib_samples=8, eval_samples=2, seq_len=128)
    artifact = result.artifacts[0]
    folder = result.out_dir / artifact.path
    stored = {}
    for file in folder.glob("*.safetensors"):
        stored.update(load_file(file))
    assert artifact.budget["bytes"] == sum(f.stat().st_size for f in folder.glob("*.safetensors")) <= 6.2e6
    layouts = {}  # module -> (bits, group size), read from its own tensors: 32 * qweight rows / inputs, g_idx
    for name, tensor in stored.items():
        if name.endswith(".qweight"):
            g_idx = stored[name.replace("qweight", "g_idx")]
            layouts[name.removesuffix(".qweight")] = (32 * tensor.shape[0] // g_idx.shape[0],
                                                     g_idx.shape[0] // (int(g_idx.max()) + 1))
    # 0.26 MB above the all-4-bit g64 size: some modules upgraded (8 bits or g32), none below 4 bits
    assert len(set(layouts.values())) > 1 and min(b for b, _ in layouts.values()) == 4, layouts
    chosen = {n.removesuffix(".weight"): tuple(int(x.removeprefix("int").removeprefix("g")) for x in
                                                 (t.split("-")[0], t.split("-")[2])) for n, t in
              artifact.budget["types"].items()}
    assert chosen == layouts
    config = json.loads((folder / "config.json").read_text())["quantization_config"]

    def from_config(module: str) -> tuple[int, int]:  # GPTQModel's rule: the first matching pattern's overrides
        for pattern, override in config["dynamic"].items():
            if re.match(pattern.removeprefix("+:"), module):
                return override.get("bits", config["bits"]), override.get("group_size", config["group_size"])
        return config["bits"], config["group_size"]

    assert all(from_config(m) == layout for m, layout in layouts.items())
    assert artifact.runtime["name"].startswith("gptqmodel") and artifact.verdict == "accepted", artifact.failures

    ids = make_samples(ModelSource().tokenizer(), "builtin", "eval", 2, 128).ids
    with torch.no_grad():
        ours = decoded_reference(folder, "hf-gptq")(input_ids=ids).logits
        quantkit_runtime = load_quantized_model(folder)(input_ids=ids).logits
    theirs = torch.stack([torch.from_numpy(x) for x in hf_logits(folder, ids, progress=False)])
    # same integers decoded by each; the differences are fp16 scales and matmul order (see test_hf_checkpoints)
    bound = 1e-2 * max(ours.abs().max().item(), 1.0)
    assert (theirs - ours).abs().max().item() < bound and (quantkit_runtime - ours).abs().max().item() < bound
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
