"""llama.cpp's own command-line tools reading what quantkit writes: ``llama-quantize --imatrix`` given the
importance matrix ``quantkit ship --imatrix calib`` collected (GGUF and legacy .dat), quantizing
quantkit's F32 file, must give quantkit's own file byte for byte.

    python benchmarks/llama_tools.py [MODEL_DIR] [--types Q4_K_M,Q3_K_M,Q4_0]
    # writes benchmarks/results/llama_tools.{md,json}

The tools are built once from llama-cpp-python's source distribution (the llama.cpp it vendors, the
library quantkit checks artifacts with): ~15 minutes of compiling on 2 cores, cached in
``~/.cache/quantkit/llama.cpp-<version>`` (``--tools DIR`` to reuse a build elsewhere). Too slow for CI,
which checks the same bytes through llama.cpp's library (tests/test_imatrix.py); this checks that
llama.cpp's own file reader takes our files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VERSION = metadata.version("llama-cpp-python")
CACHE = Path.home() / ".cache" / "quantkit" / f"llama.cpp-{VERSION}"


def build_tools(cache: Path) -> Path:
    """llama-quantize and llama-bench built from llama-cpp-python's sdist (its vendored llama.cpp); returns
    llama-quantize (llama-bench lies beside it, for benchmarks/bench_smollm2.py)."""
    binary = cache / "build" / "bin" / "llama-quantize"
    if binary.is_file() and binary.with_name("llama-bench").is_file():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    f"llama-cpp-python=={VERSION}", "-d", str(cache)], check=True)
    sdist = next(cache.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        archive.extractall(cache, filter="data")
    source = next(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))
    subprocess.run(["cmake", "-S", str(source), "-B", str(cache / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_CURL=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(cache / "build"), "--target", "llama-quantize", "llama-bench",
                    "-j2"], check=True)
    return binary


def tensors(path: Path) -> dict:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="Hugging Face folder (default: the embedded model)")
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M,Q4_0")
    ap.add_argument("--tools", type=Path, default=CACHE, help="where llama.cpp's tools are (or get) built")
    ap.add_argument("--build-only", action="store_true", help="build the tools and print where they are")
    args = ap.parse_args()
    from quantkit.imatrix import read_imatrix, write_imatrix

    quantize = build_tools(args.tools)
    if args.build_only:
        print(quantize.parent)
        return
    types = args.types.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ours"
        targets = ",".join(["gguf:F32", *(f"gguf:{t}" for t in types)])
        subprocess.run([sys.executable, "-m", "quantkit.cli", "ship", *([args.model] if args.model else []),
                        "--targets", targets, "--imatrix", "calib", "--no-verify", "--quiet", "--out", str(out)],
                       check=True)
        legacy = write_imatrix(read_imatrix(out / "imatrix.gguf"), Path(tmp) / "imatrix.dat")
        for imatrix in (out / "imatrix.gguf", legacy):
            for ftype in types:
                theirs = Path(tmp) / f"theirs-{ftype}.gguf"
                done = subprocess.run([str(quantize), "--imatrix", str(imatrix), str(out / "model-F32.gguf"),
                                       str(theirs), ftype], capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"llama-quantize failed:\n{done.stderr[-2000:]}")
                ours, them = tensors(out / f"model-{ftype}.gguf"), tensors(theirs)
                same = sum(1 for name, value in them.items() if ours.get(name) == value)
                loaded = [line for line in done.stderr.splitlines() if "imatrix" in line.lower()][:2]
                rows.append({"imatrix": imatrix.name, "type": ftype, "tensors": len(them), "identical": same,
                             "llama_quantize_says": loaded})
                print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/llama_tools.py " + " ".join(sys.argv[1:])
    payload = {"command": command.strip(), "llama.cpp": f"vendored by llama-cpp-python {VERSION}", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llama_tools.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# llama.cpp's llama-quantize reading quantkit's importance matrix", "",
             f"Command: `{payload['command']}` (llama-quantize built from the llama.cpp that llama-cpp-python "
             f"{VERSION} vendors). quantkit collects the imatrix from its calibration text (`ship --imatrix calib`, "
             "written as `imatrix.gguf`; the legacy `.dat` is the same matrix written by quantkit's other writer); "
             "llama-quantize reads it and quantizes quantkit's F32 file; every tensor compared with quantkit's "
             "own file of that type.", "",
             "| imatrix file | type | identical tensors | llama-quantize's log about the imatrix |",
             "|---|---|---|---|"]
    for r in rows:
        said = "; ".join(r["llama_quantize_says"]).replace("|", "/")
        lines.append(f"| {r['imatrix']} | {r['type']} | {r['identical']}/{r['tensors']} | {said} |")
    (RESULTS / "llama_tools.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
