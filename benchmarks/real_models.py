"""quantkit on real models: GGUF speed, memory and accuracy beside llama.cpp's own quantizer, and the
calibrated methods on a trained model.

    python benchmarks/real_models.py gguf SMOLLM2 --types Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K
    python benchmarks/real_models.py shapes /work/models/llama1b --name llama-3.2-1b
    python benchmarks/real_models.py methods SMOLLM2
    python benchmarks/real_models.py report        # results/real_models.md from results/real_models.json

``gguf``: for each file type, ``quantkit ship MODEL --targets gguf:TYPE --no-verify`` and llama.cpp's
``llama_model_quantize`` from an F32 GGUF of the same weights, each in its own process, timed (wall) with
its peak RSS (``/usr/bin/time``); every tensor's type and bytes compared; both files scored in llama.cpp
(perplexity, KLD, top-1 against the transformers fp32 reference) when they differ, once when identical.
``shapes``: the same timing for Q4_K_M on a random-weight checkpoint of a real shape (made by
``make_checkpoint.py``), llama.cpp quantizing from a BF16 GGUF of the same weights; nothing scored.
``methods``: RTN, RTN with an importance matrix, GPTQ and AWQ on GGUF Q4_K_M and Q3_K_M, and llama.cpp's
quantizer with the same importance matrix, scored in llama.cpp; the integer-grid rows and the peers come
from ``peers.py`` (see README). Text: the Python reference manual's prose (``pydoc_data.topics``), topics
alternating between calibration and evaluation. Both tools use every core (quantkit's ggml calls split rows
over ``os.cpu_count()`` threads; llama_model_quantize's nthread 0 is the hardware concurrency). Run alone on
an idle machine: timings are wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "real_models.json"
EVAL_SAMPLES, CALIB_SAMPLES, SEQ_LEN = 16, 32, 512


def prose(folder: Path) -> tuple[Path, Path]:
    """Calibration and evaluation text: the Python reference manual, topics alternating between the two."""
    import pydoc_data.topics as topics

    names = sorted(topics.topics)
    calib, evals = folder / "calib.txt", folder / "eval.txt"
    calib.write_text("\n\n".join(topics.topics[n] for n in names[0::2]))
    evals.write_text("\n\n".join(topics.topics[n] for n in names[1::2]))
    return calib, evals


def timed(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (MiB) of a command, from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        start = time.time()
        done = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", report.name, *cmd], capture_output=True,
                              text=True)
        wall = time.time() - start
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        seconds, kib = report.read().split()[-2:]
    result = {"seconds": round(float(seconds), 2), "wall": round(wall, 2), "peak_rss_mib": round(int(kib) / 1024)}
    for line in done.stdout.splitlines():  # the llama_model_quantize call alone, printed by QUANTIZE_SCRIPT
        if line.startswith("quantize_seconds"):
            result["core_seconds"] = round(float(line.split()[1]), 2)
    return result


def with_export_seconds(t: dict, out: Path) -> dict:
    """Add the export stage alone (what the manifest records: plan, read, quantize, write) to a ship timing."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {**t, "core_seconds": manifest["artifacts"][0]["seconds"]["export"]}


def ship_cmd(model: Path, target: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quantkit.cli", "ship", str(model), "--targets", target, "--out", str(out),
            "--quiet", "--overwrite", *extra]


# llama_model_quantize in a process of its own; an importance matrix file is read with quantkit's reader and
# handed over as llama-quantize hands over the one it reads (name -> importance per input column).
QUANTIZE_SCRIPT = """
import sys, ctypes, numpy as np, llama_cpp
src, dst, ftype = sys.argv[1], sys.argv[2], sys.argv[3]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
if len(sys.argv) > 4:
    from quantkit.imatrix import read_imatrix
    matrix = read_imatrix(sys.argv[4])
    values = {n: np.ascontiguousarray(matrix.values(n), dtype=np.float32) for n in matrix.entries}
    table = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    for row, (name, v) in zip(table, values.items()):
        row.name, row.size = name.encode(), v.size
        row.data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params.imatrix = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
import time
start = time.time()
if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
    raise SystemExit("llama_model_quantize failed")
print("quantize_seconds", time.time() - start)
"""


def llama_quantize_cmd(src: Path, dst: Path, ftype: str, imatrix: Path | None = None) -> list[str]:
    return [sys.executable, "-c", QUANTIZE_SCRIPT, str(src), str(dst), ftype, *([str(imatrix)] if imatrix else [])]


def same_tensors(a: Path, b: Path) -> dict:
    ours = {t.name: t for t in gguf.GGUFReader(a).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(b).tensors}
    same = sum(1 for name, t in ours.items() if name in theirs and t.tensor_type == theirs[name].tensor_type
               and np.array_equal(np.asarray(t.data), np.asarray(theirs[name].data)))
    return {"tensors": len(theirs), "identical": same, "all_identical": same == len(theirs) == len(ours)}


class Scorer:
    """The fp32 reference on the evaluation text, and llama.cpp's logits of any GGUF file scored against it."""

    def __init__(self, model: Path, eval_text: Path, scratch: Path):
        from quantkit.data import make_samples
        from quantkit.model import ModelSource
        from quantkit.reference import Reference

        source = ModelSource(model)
        self.samples = make_samples(source.tokenizer(), str(eval_text), "eval", EVAL_SAMPLES, SEQ_LEN)
        self.reference = Reference(source, self.samples, scratch)

    def __call__(self, path: Path) -> dict:
        from quantkit.checks import score
        from quantkit.targets.gguf import GGUFTarget

        logits = GGUFTarget(None).logits(path, self.samples.ids, progress=False)
        metrics = score(self.samples.ids, logits, self.reference, self.reference.metrics.perplexity).to_dict()
        return {k: metrics[k] for k in ("perplexity", "ppl_increase_pct", "kld", "top1")}


def environment() -> dict:
    from importlib import metadata

    import quantkit

    return {"quantkit": quantkit.__version__, "llama-cpp-python": metadata.version("llama-cpp-python"),
            "torch": metadata.version("torch"), "python": platform.python_version(), "cpus": os.cpu_count(),
            "cpu": _cpu_name()}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def gguf_types(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        tmp = Path(tmp)
        calib, evals = prose(tmp)
        f32 = timed(ship_cmd(args.model, "gguf:F32", tmp / "f32", "--no-verify"))
        source = tmp / "f32" / "model-F32.gguf"
        scorer = Scorer(args.model, evals, tmp)
        rows.append({"type": "F32", "quantkit": f32, "metrics": scorer(source)})
        for ftype in args.types.split(","):
            ours = with_export_seconds(timed(ship_cmd(args.model, f"gguf:{ftype}", tmp / "ours", "--no-verify")),
                                       tmp / "ours")
            ours_path = tmp / "ours" / f"model-{ftype}.gguf"
            theirs_path = tmp / f"llama-{ftype}.gguf"
            theirs = timed(llama_quantize_cmd(source, theirs_path, ftype))
            same = same_tensors(ours_path, theirs_path)
            row = {"type": ftype, "bytes": ours_path.stat().st_size, "quantkit": ours, "llama.cpp": theirs,
                   "same_bytes": same, "metrics": scorer(ours_path)}
            if not same["all_identical"]:
                row["llama.cpp_metrics"] = scorer(theirs_path)
            rows.append(row)
            print(json.dumps(row), flush=True)
            theirs_path.unlink()
        scorer.reference.close()
    return {"model": args.model.name, "rows": rows, "reference_perplexity": None}


def shapes(args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        tmp = Path(tmp)
        bf16 = timed(ship_cmd(args.model, "gguf:BF16", tmp / "bf16", "--no-verify"))
        source = tmp / "bf16" / "model-BF16.gguf"
        ours = with_export_seconds(timed(ship_cmd(args.model, "gguf:Q4_K_M", tmp / "ours", "--no-verify")),
                                   tmp / "ours")
        ours_path = tmp / "ours" / "model-Q4_K_M.gguf"
        theirs = timed(llama_quantize_cmd(source, tmp / "llama.gguf", "Q4_K_M"))
        same = same_tensors(ours_path, tmp / "llama.gguf")
        size = ours_path.stat().st_size
    config = json.loads((args.model / "config.json").read_text())
    return {"model": args.name, "layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
            "bytes": size, "export_bf16": bf16,
            "quantkit": ours, "llama.cpp": theirs, "same_bytes": same}


def scored_setup(model: Path, tmp: Path) -> tuple[list[str], Scorer, Path]:
    """The prose calibration options, the scorer on the prose evaluation text, and an F32 GGUF of ``model``
    (llama.cpp's quantizer's source) in ``tmp``/f32."""
    calib, evals = prose(tmp)
    data = ["--calib", str(calib), "--calib-samples", str(CALIB_SAMPLES), "--seq-len", str(SEQ_LEN)]
    scorer = Scorer(model, evals, tmp)
    subprocess.run(ship_cmd(model, "gguf:F32", tmp / "f32", "--no-verify"), check=True)
    return data, scorer, tmp / "f32"


def methods(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        tmp = Path(tmp)
        data, scorer, f32 = scored_setup(args.model, tmp)
        for ftype in args.types.split(","):
            runs = {"rtn": [], "rtn+imatrix": ["--imatrix", "calib"], "gptq": ["--method", "gptq"],
                    "awq": ["--method", "awq"]}
            for label, extra in runs.items():
                if args.only and label not in args.only.split(","):
                    continue
                out = tmp / label
                t = timed(ship_cmd(args.model, f"gguf:{ftype}", out, "--no-verify", *data, *extra))
                row = {"type": ftype, "tool": "quantkit", "method": label, "time": t,
                       "metrics": scorer(out / f"model-{ftype}.gguf")}
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.only and "llama.cpp" not in args.only.split(","):
                continue
            theirs = tmp / f"llama-{ftype}.gguf"
            t = timed(llama_quantize_cmd(f32 / "model-F32.gguf", theirs, ftype, tmp / "rtn+imatrix" / "imatrix.gguf"))
            row = {"type": ftype, "tool": "llama.cpp", "method": "imatrix (same calibration text)", "time": t,
                   "metrics": scorer(theirs),
                   "same_bytes_as_quantkit_rtn_imatrix": same_tensors(tmp / "rtn+imatrix" / f"model-{ftype}.gguf",
                                                                      theirs)["all_identical"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        reference = scorer.reference.metrics.perplexity
        scorer.reference.close()
    return {"model": args.model.name, "reference_perplexity": round(reference, 4), "rows": rows}


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each row that ``new`` measured again replaced in place."""
    def key(r):
        return r["type"], r["tool"], r["method"]

    fresh = {key(r): r for r in new}
    return [fresh.get(key(r), r) for r in old]


def _fmt_time(t: dict | None) -> str:
    return "-" if not t else f"{t['seconds']:.1f} s / {t['peak_rss_mib']} MiB"


def _core(t: dict) -> str:
    return f"{t['core_seconds']:.2f}" if "core_seconds" in t else "-"


def _ratio(ours: dict, theirs: dict, key: str) -> str:
    return f"{ours[key] / theirs[key]:.2f}" if key in ours and key in theirs else "-"


def _metrics(m: dict | None) -> str:
    if not m:
        return "- | - | - | -"
    delta = "-" if m.get("ppl_increase_pct") is None else f"{m['ppl_increase_pct']:+.2f}"
    return f"{m['perplexity']:.3f} | {delta} | {m['kld']:.5f} | {m['top1']:.4f}"


def report(results: dict) -> str:
    env = results.get("environment", {})
    lines = ["# quantkit on real models", "",
             f"Machine: {env.get('cpu', '?')}, {env.get('cpus', '?')} cores; quantkit {env.get('quantkit')}, "
             f"llama-cpp-python {env.get('llama-cpp-python')}, torch {env.get('torch')}, Python "
             f"{env.get('python')}. Times are wall clock of the whole process (start-up, reading, quantizing, "
             "writing) on an otherwise idle machine, peak RSS from GNU time; both tools on every core.", ""]
    if "gguf" in results:
        g = results["gguf"]
        lines += [f"## GGUF file types on {g['model']}: quantkit vs llama.cpp's quantizer", "",
                  f"Command: `{g['command']}`. quantkit quantizes from the Hugging Face folder (`ship --no-verify`); "
                  "llama.cpp from an F32 GGUF of the same weights. Scores: llama.cpp's logits on "
                  f"{EVAL_SAMPLES} x {SEQ_LEN} tokens of prose against the transformers fp32 reference (identical "
                  "files score identically, so one row of metrics serves both).", "",
                  "Process: the whole command (interpreter start and imports included). Core: quantkit's export stage "
                  "(the manifest's `seconds.export`: read, quantize, write) and the `llama_model_quantize` call.", "",
                  "| type | size MiB | quantkit process / peak RSS | llama.cpp process / peak RSS | ratio | core s "
                  "quantkit / llama.cpp | core ratio | same bytes | ppl | Δppl % | KLD | top-1 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in g["rows"]:
            if r["type"] == "F32":
                lines.append(f"| F32 (llama.cpp's source) | - | {_fmt_time(r['quantkit'])} | - | - | - | - | - | "
                             f"{_metrics(r['metrics'])} |")
                continue
            ours, theirs, same = r["quantkit"], r["llama.cpp"], r["same_bytes"]
            lines.append(f"| {r['type']} | {r['bytes'] / 2**20:.1f} | {_fmt_time(ours)} | {_fmt_time(theirs)} | "
                         f"{_ratio(ours, theirs, 'seconds')} | {_core(ours)} / {_core(theirs)} | "
                         f"{_ratio(ours, theirs, 'core_seconds')} | {same['identical']}/{same['tensors']} | "
                         f"{_metrics(r['metrics'])} |")
        lines.append("")
    if results.get("shapes"):
        lines += ["## Real shapes, random weights: `ship --no-verify --targets gguf:Q4_K_M` vs llama.cpp", "",
                  "llama.cpp quantizes from a BF16 GGUF of the same weights (written by `quantkit ship --targets "
                  "gguf:BF16 --no-verify`, timed in the last column).", "",
                  "| checkpoint | layers | hidden | Q4_K_M GiB | quantkit process / peak RSS "
                  "| llama.cpp process / peak RSS | ratio | core s quantkit / llama.cpp | core ratio | same bytes "
                  "| BF16 export |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["shapes"].values():
            ours, theirs, same = r["quantkit"], r["llama.cpp"], r["same_bytes"]
            size = "-" if r["bytes"] is None else f"{r['bytes'] / 2**30:.2f}"
            lines.append(f"| {r['model']} | {r['layers']} | {r['hidden']} | {size} | {_fmt_time(ours)} | "
                         f"{_fmt_time(theirs)} | {_ratio(ours, theirs, 'seconds')} | {_core(ours)} / {_core(theirs)} "
                         f"| {_ratio(ours, theirs, 'core_seconds')} | {same['identical']}/{same['tensors']} | "
                         f"{_fmt_time(r['export_bf16'])} |")
        lines += [""] + [f"Command: `{r['command']}`" for r in results["shapes"].values()] + [""]
    if "methods" in results:
        m = results["methods"]
        lines += [f"## Calibrated methods on {m['model']} (GGUF, scored in llama.cpp)", "",
                  f"Command: `{m['command']}`. Calibration: {CALIB_SAMPLES} x {SEQ_LEN} tokens of prose; evaluation "
                  f"{EVAL_SAMPLES} x {SEQ_LEN} other tokens; reference perplexity {m['reference_perplexity']}. "
                  "Time: the whole `ship --no-verify` process (calibration included) / llama_model_quantize.", "",
                  "| type | tool | method | time / peak RSS | ppl | Δppl % | KLD | top-1 |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            method = r["method"]
            if "same_bytes_as_quantkit_rtn_imatrix" in r:
                same = "identical" if r["same_bytes_as_quantkit_rtn_imatrix"] else "different"
                method += f", bytes {same} to quantkit rtn+imatrix"
            lines.append(f"| {r['type']} | {r['tool']} | {method} | {_fmt_time(r['time'])} | "
                         f"{_metrics(r['metrics'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    for name in ("gguf", "shapes", "methods"):
        p = sub.add_parser(name)
        p.add_argument("model", type=Path)
        p.add_argument("--types", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K" if name == "gguf"
                       else "Q4_K_M,Q3_K_M")
        p.add_argument("--name", default=None)
        p.add_argument("--scratch", default=None, help="folder for temporary files (default: the system's)")
        p.add_argument("--only", default=None, help="methods: rerun only these rows (rtn, rtn+imatrix, gptq, awq, "
                       "llama.cpp), keeping the others from the results file")
    sub.add_parser("report")
    args = ap.parse_args()
    results = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else {}
    if args.part != "report":
        part = {"gguf": gguf_types, "shapes": shapes, "methods": methods}[args.part](args)
        part["command"] = "python benchmarks/real_models.py " + " ".join(sys.argv[1:])
        if args.part == "shapes":
            results.setdefault("shapes", {})[args.name or args.model.name] = part
        elif args.part == "methods" and args.only and "methods" in results:
            part["rows"] = merge_rows(results["methods"]["rows"], part["rows"])
            part["command"] = results["methods"]["command"] + f"; rows {args.only} rerun by `{part['command']}`"
            results[args.part] = part
        else:
            results[args.part] = part
        results["environment"] = environment()
        RESULTS.mkdir(parents=True, exist_ok=True)
        JSON_PATH.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "real_models.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
