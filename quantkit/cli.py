"""Command line: quantkit ship, build / plan (recipe files), bench (and bench compare) and inspect.

Exit codes: 0 success; 1 an artifact was rejected (accuracy gate or tokenizer; it is kept under
OUT/rejected/); 2 bad input (one line on stderr naming the problem and the fix; nothing written);
3 an unexpected internal or runtime failure (one line; the traceback goes to a log file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.pipeline import DEFAULT_TARGETS, LOAD_FAILURE

SHIP_EPILOG = """\
targets:
  gguf:TYPE   llama.cpp GGUF file of llama.cpp's file type TYPE: F32, F16, BF16, Q8_0, Q6_K, Q5_1,
              Q5_0, Q4_1, Q4_0, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q3_K_L, Q3_K_M, Q3_K_S, Q2_K,
              Q2_K_S (needs an importance matrix); Q5_K, Q4_K, Q3_K are aliases of the _M types, as in
              llama-quantize. Every matrix gets the type llama.cpp's quantizer gives it for that file
              type (token embedding and output included; output in Q6_K), byte-identical to llama.cpp;
              --pure puts every matrix in the base type; --tensor-type and the two shortcuts override.
              Checked by loading it in llama.cpp (llama-cpp-python) and scoring its logits.
              GGUF block types fix their own grid (32-weight blocks).
  hf-gptq     Hugging Face GPTQ v1 checkpoint folder (2/4/8 bit) on the --bits/--group-size/--scheme grid.
  hf-awq      Hugging Face AWQ GEMM checkpoint folder (4 bit, group-wise).
              Both checked by loading them in transformers with gptqmodel + optimum (pip install '.[hf]').
  onnx[:fp32|fp16]  ONNX decoder with KV cache (optimum / onnxruntime-genai input and output names);
              quantized linears are com.microsoft MatMulNBits holding quantkit's integers (2/4/8 bit,
              group size a power of two >= 16, or -1). Checked in onnxruntime (pip install '.[onnx]').
  onnx-genai[:int8|fp32]  onnxruntime-genai model folder built by onnxruntime-genai's own model builder
              over quantkit's integers (4/8 bit, group-wise; checked equal to quantkit's after the build):
              apps generate with og.Model / og.Generator. int8 (default): int8 activations inside
              MatMulNBits, the builder's CPU default; fp32: fp32 activations. Llama, Mistral, Qwen2/3,
              Gemma 2/3, Phi-3. Checked in onnxruntime-genai itself (pip install '.[onnx]').
  ort[:fp32|fp16]   the same decoder in ORT format for mobile / reduced builds, with its
              required_operators.config. Checked by loading model.ort in onnxruntime.
  executorch[:8da4w|8da8w|fp32]  ExecuTorch folder (model.pte + tokenizer) lowered to XNNPACK: int4
              group-wise (8da4w, --group-size a multiple of 32 or -1), int8 per-channel (8da8w) or fp32
              weights, int8 dynamic activations; forward(tokens, input_pos) with a static KV cache as
              ExecuTorch's LLM runner expects (Llama, Mistral, Qwen2, Qwen3; other families: one
              full-sequence forward). Checked in the ExecuTorch runtime (pip install '.[executorch]').

exit codes: 0 all artifacts accepted (or exported, with --no-verify), 1 an artifact was rejected (its gate
or its tokenizer), 2 bad input, 3 an internal or runtime failure (details in the log file it names).

examples:
  quantkit ship                                   # embedded model -> Q4_K_M and Q8_0 GGUF in ./quantkit-out
  quantkit ship ./my-llama --targets gguf:Q5_K_M --out dist --json
  quantkit ship ./my-llama --method gptq --targets gguf:Q4_K_M --calib notes.txt
  quantkit ship ./my-llama --targets gguf:Q4_K_M --no-verify   # export only, as llama-quantize would
"""


def _targets(value: str) -> list[str]:
    return [t for t in (v.strip() for v in value.split(",")) if t]


def _add_ship(sub) -> None:
    p = sub.add_parser(
        "ship",
        help="quantize a model, export artifacts, verify each in its runtime, write a manifest",
        description="Quantize MODEL_DIR for each target, verify each artifact's accuracy in its own runtime "
        "against the unquantized model, and write the artifacts and manifest.json to --out.",
        epilog=SHIP_EPILOG + _method_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None, metavar="MODEL_DIR",
                   help="local Hugging Face checkpoint folder (default: the embedded model shipped with quantkit)")
    p.add_argument("--targets", type=_targets, default=list(DEFAULT_TARGETS),
                   help=f"comma-separated artifacts to build (default: {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--out", default="quantkit-out", help="output folder (default: ./quantkit-out)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace artifacts and manifest.json of an earlier run in --out (other files are kept)")
    q = p.add_argument_group("quantization")
    q.add_argument("--method", default="rtn",
                   help="rtn (round-to-nearest), gptq (error-compensating) or awq (activation-aware scaling); "
                   "gptq and awq learn from --calib text (default: rtn)")
    q.add_argument("--bits", type=int, default=4, help="bits per weight of the integer grid, 2-8 (default: 4)")
    q.add_argument("--group-size", type=int, default=128,
                   help="weights per group along a row; -1 per channel, 0 per tensor (default: 128). Used by the "
                   "integer-grid targets (hf-gptq, hf-awq, onnx, ort, executorch); GGUF types fix their own blocks")
    q.add_argument("--scheme", choices=("sym", "asym"), default="sym",
                   help="sym = absmax, asym = zero-point (default: sym)")
    q.add_argument("--damp-percent", type=float, default=0.01,
                   help="gptq: Hessian damping as a fraction of its mean diagonal (default: 0.01)")
    q.add_argument("--act-order", choices=("static", "group", "off"), default="static",
                   help="gptq: static = sweep columns by decreasing Hessian diagonal, groups fitted up front and "
                   "kept in column order (no g_idx; llm-compressor's default); group = groups follow the sweep "
                   "(desc_act, g_idx in hf-gptq); off = columns in order. GGUF grids keep groups in column order "
                   "either way (default: static)")
    q.add_argument("--static-groups", action="store_true",
                   help="gptq with --act-order off: fit group scales on the original weights before the sweep")
    q.add_argument("--weighted-fit", action=argparse.BooleanOptionalAction, default=True,
                   help="gptq on GGUF grids: fit block scales with ggml's importance-weighted search, weighted by "
                   "the Hessian diagonal (the imatrix's quantity) (default: on)")
    q.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", dest="method_options",
                   help="an option of the --method's config, repeatable; the options are listed at the end of "
                   "this help (rtn has none)")
    q.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where gptq/awq run their layer-by-layer pass (default: auto = cuda if present)")
    q.add_argument("--quantize-embeddings", action="store_true",
                   help="also quantize the token embedding (GGUF ignores it: its file types type every matrix)")
    q.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize the output projection (GGUF ignores it: its file types type every matrix)")
    q.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="keep tensors matching GLOB unquantized, e.g. 'model.layers.0.*' (repeatable; GGUF writes "
                   "them F16)")
    q.add_argument("--pure", action="store_true",
                   help="GGUF: every matrix in the file type's base type, without llama.cpp's per-tensor rules "
                   "(output in Q6_K, more bits for some attn_v / ffn_down ...), like llama-quantize --pure")
    q.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE", dest="tensor_types",
                   help="GGUF: matrices whose GGUF name REGEX is found in get TYPE, e.g. 'attn_v=Q8_0' or "
                   "'blk\\.0\\..*=Q6_K' (Python regex searched in names like blk.0.attn_v.weight, as "
                   "llama-quantize --tensor-type does; the first matching option wins; repeatable)")
    q.add_argument("--token-embedding-type", metavar="TYPE",
                   help="GGUF: type of token_embd.weight (e.g. Q8_0, F16), before any other rule")
    q.add_argument("--output-tensor-type", metavar="TYPE",
                   help="GGUF: type of output.weight (and of a tied token embedding), before any other rule")
    q.add_argument("--target-bpw", type=float, default=None, metavar="B",
                   help="mixed precision under a budget of B bits per weight, on gguf and hf-gptq targets: each "
                   "block matrix gets the type that minimises the predicted loss (activation-weighted rounding "
                   "error, measured per type on the --calib text) within the budget. GGUF: types among Q2_K ... "
                   "Q8_0 and IQ4_XS / IQ4_NL, B over all the file's tensors as llama.cpp reports it; the file "
                   "type's embedding, output and norms stay as they are. hf-gptq: 2, 4 or 8 bits per linear at "
                   "--group-size or half of it (written as GPTQModel's `dynamic`; widths below --bits only when "
                   "the budget cannot hold every linear at --bits), B over the quantized linears with their "
                   "scales and zero points. A budget the candidates cannot reach is refused with the reachable "
                   "range")
    q.add_argument("--max-size", default=None, metavar="SIZE",
                   help="the same with a size budget: bytes or a number with a unit (90MB, 1.5GiB); GGUF: the "
                   "file, hf-gptq: the weight files (*.safetensors)")
    d = p.add_argument_group("data")
    d.add_argument("--calib", default="builtin",
                   help="calibration text: 'builtin' (stdlib split), a .txt/.jsonl file or a folder (default: builtin)")
    d.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default: 32)")
    d.add_argument("--imatrix", default="none", metavar="none|calib|PATH",
                   help="GGUF importance matrix weighting each input column's rounding error (Q8_0 ignores it; "
                   "rtn only): none; calib = mean squared activations over the --calib text, also written to "
                   "OUT/imatrix.gguf for llama-quantize --imatrix; or PATH to a llama.cpp imatrix file "
                   "(.gguf or legacy .dat) (default: none)")
    d.add_argument("--eval", default="builtin", help="evaluation text, same forms as --calib (default: builtin)")
    d.add_argument("--eval-samples", type=int, default=16, help="evaluation sequences (default: 16)")
    d.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    g = p.add_argument_group("accuracy gates (defaults depend on bits per weight; see README)")
    g.add_argument("--runtime", choices=("transformers", "quantkit"), default="transformers",
                   help="what loads hf-gptq / hf-awq artifacts for checking: transformers + gptqmodel, or "
                   "quantkit's own QuantLinear runtime (default: transformers)")
    g.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT",
                   help="largest allowed perplexity increase over the reference, in percent")
    g.add_argument("--max-kld", type=float, default=None, help="largest allowed mean KL divergence (nats)")
    g.add_argument("--min-top1", type=float, default=None, help="smallest allowed top-1 agreement (0-1)")
    g.add_argument("--no-verify", dest="verify", action="store_false",
                   help="export only: no reference, no runtime check, no gate; the manifest says nothing was checked")
    g.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="accept an artifact whose runtime tokenizes the evaluation text differently from "
                   "tokenizer.json (otherwise rejected; the manifest records the override and the differences)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print manifest.json on stdout (the table goes to stderr)")
    o.add_argument("--events", metavar="FILE", default=None,
                   help="write JSON Lines progress events (schema quantkit.events/1: start, stage, block, artifact "
                   "with its verdict, done or failed) to FILE, or to stdout with '-' (not with --json)")
    o.add_argument("--quiet", action="store_true", help="no progress bars or step messages")
    o.add_argument("--verbose", action="store_true",
                   help="let third-party libraries print their warnings and logs (hidden by default)")
    _add_cache_option(o, default=False)
    b = p.add_argument_group("benchmark (after a successful ship; see quantkit bench --help)")
    b.add_argument("--bench", action="store_true", help="benchmark every accepted artifact on this machine")
    b.add_argument("--bench-json", metavar="FILE", help="with --bench: write its JSON Lines to FILE")
    b.add_argument("--bench-html", metavar="FILE", help="with --bench: write its HTML report to FILE")
    _add_bench_options(b)


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _add_bench_options(group, runtime_flags: tuple[str, ...] = ("--bench-runtime",),
                       device_flags: tuple[str, ...] = ("--bench-device",)) -> None:
    from quantkit.bench.runners import RUNNERS, cpu_count

    group.add_argument("--prompt-tokens", type=_ints, default=(128, 512), metavar="N[,N...]",
                       help="prompt lengths, one workload each: prefill throughput and time to first token "
                       "(default: 128,512)")
    group.add_argument("--gen-tokens", type=int, default=128, help="decode steps after each prompt (default: 128)")
    group.add_argument("--threads", type=int, default=cpu_count(),
                       help=f"threads the runtime may use (default: the CPUs this process may use, {cpu_count()})")
    group.add_argument("--repetitions", type=int, default=5,
                       help="measured sequences per workload; medians and 95%% intervals over them (default: 5)")
    group.add_argument("--warmup", type=int, default=1, help="unmeasured sequences before them (default: 1)")
    group.add_argument(*runtime_flags, dest="bench_runtime", choices=sorted(RUNNERS),
                       help="runtime to load every artifact with (default: chosen from each artifact)")
    group.add_argument("--pin", action="store_true", help="pin the runtime to the first --threads CPUs")
    group.add_argument(*device_flags, dest="bench_device", default="local", metavar="DEVICE",
                       help="where to measure: local (default), ssh://[user@]host[:port] (copies the artifact and "
                       "quantkit's runner there; the remote needs Python and the runtime's package), or adb[:SERIAL] "
                       "(designed, untested on hardware: refused)")
    group.add_argument("--ssh-identity", metavar="FILE", help="with an ssh:// device: the private key to use")
    group.add_argument("--remote-python", default="python3", metavar="PATH",
                       help="with an ssh:// device: the remote Python that runs the runner (default: python3)")


BENCH_EPILOG = """\
ARTIFACT is a .gguf file (llama.cpp), an onnx / ort artifact folder or its model file (onnxruntime), a .pte
(ExecuTorch runtime; today's program has no KV cache, so each decode step re-runs the sequence), a
Hugging Face folder (hf-gptq / hf-awq checkpoint or unquantized model: transformers), a manifest.json or a
quantkit ship output folder (every artifact in it, with its accuracy from the manifest).
Each artifact runs in its own child process: load, then per workload --warmup unmeasured and --repetitions
measured sequences of a random-token prompt and --gen-tokens greedy decode steps.

  quantkit bench compare OLD.jsonl NEW.jsonl   flags throughput / time-to-first-token regressions of NEW
      (one-sided Mann-Whitney U test on the per-repetition samples, p < --alpha 0.01, and at least
      --min-change 10 % worse); exit 1 when any is found

exit codes: 0 done, 1 a regression (compare), 2 bad input (an artifact no runtime loads, unknown runtime),
3 a runtime crashed mid-run (measurements taken before it are kept in --json FILE).
"""


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure load time, latency, throughput and memory of artifacts",
                       description="Benchmark artifacts in their runtimes on this machine. 'quantkit bench compare "
                       "OLD.jsonl NEW.jsonl' compares two runs.", epilog=BENCH_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT_OR_MANIFEST")
    p.add_argument("--json", metavar="FILE", help="write JSON Lines (schema quantkit.bench/1) with raw samples")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with plots: decode speed vs "
                   "size vs accuracy (Pareto front), decode latency distributions, memory per phase (needs "
                   "matplotlib: the bench extra)")
    _add_bench_options(p, ("--runtime", "--bench-runtime"), ("--device", "--bench-device"))


def _add_cache_option(group, default: bool) -> None:
    state = "on" if default else "off"
    group.add_argument("--cache", nargs="?", const="", default="" if default else None, metavar="DIR",
                       help="the build cache (default folder: $QUANTKIT_CACHE or ~/.cache/quantkit/builds): a run "
                       "whose model files, recipe, calibration/eval text, targets, quantkit source and library "
                       "versions are unchanged copies its artifacts and manifest back (a cache hit: nothing "
                       "quantized or evaluated), a damaged entry is rebuilt, and a killed GPTQ/AWQ pass resumes "
                       f"after its last finished block (default: {state})")
    group.add_argument("--no-cache", dest="cache", action="store_const", const=None, help="do not use the cache")


def _cache(value: str | None):
    """--cache's value as a BuildCache (None: no cache)."""
    if value is None:
        return None
    from quantkit.cache import BuildCache

    return BuildCache(Path(value) if value else None)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show what an artifact holds (metadata, tensor types, bits per weight)",
                       description="Show an artifact's metadata and tensors with their types and bits per weight: "
                       "a .gguf file, or an hf-gptq / hf-awq checkpoint folder.")
    p.add_argument("artifact", help="path to a .gguf file or a checkpoint folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tensors", action="store_true", help="list every tensor (default: a summary by type)")


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="run a recipe file's matrix (models x quantization settings x targets)",
                       description="Run every cell of RECIPE.toml (one ship run per model and [quant.*] table, into "
                       "OUT/<model>/<quant>/) through the build cache: unchanged cells are copied back, changed "
                       "ones quantized and checked. Every cell is checked before any works.",
                       epilog="exit codes: 0 every artifact accepted, 1 an artifact was rejected by its gate, 2 a "
                       "bad recipe or input (one line naming the file, table and key), 3 an internal or runtime "
                       "failure.\nsee examples/recipe.toml for the format.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", metavar="RECIPE.toml", help="the recipe file")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: cells one after another here (default); ray: one Ray task per cell, with the "
                   "recipe's cpus_per_cell / memory_gb_per_cell / gpus_per_cell (pip install 'quantkit[ray]')")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --executor ray: the cluster to join (e.g. ray://head:10001 or auto); default: a local "
                   "Ray instance started for the build")
    p.add_argument("--json", action="store_true", help="print each cell's outcome as JSON on stdout")
    p.add_argument("--events", metavar="FILE", default=None,
                   help="JSON Lines progress events of every cell (local executor), to FILE or '-' for stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or step messages")
    p.add_argument("--verbose", action="store_true", help="let third-party libraries print their warnings and logs")
    p.add_argument("--cache", nargs="?", const="", default="recipe", metavar="DIR",
                   help="the cache folder (default: the recipe's [build] cache, else $QUANTKIT_CACHE or "
                   "~/.cache/quantkit/builds)")
    p.add_argument("--no-cache", dest="cache", action="store_const", const=None, help="build every cell anew")
    q = sub.add_parser("plan", help="show what quantkit build would run and what is cached, touching nothing",
                       description="Check every cell of RECIPE.toml as quantkit build would (model, targets, "
                       "method) and show its output folder, cache key and whether the cache holds it.")
    q.add_argument("recipe", metavar="RECIPE.toml", help="the recipe file")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    q.add_argument("--cache", default="recipe", metavar="DIR", help="the cache folder to look in (default: as build)")


def _load_build_recipe(args):
    from dataclasses import replace

    from quantkit.builder import load_recipe

    recipe = load_recipe(args.recipe)
    if args.cache != "recipe":
        recipe = replace(recipe, cache=False if args.cache is None else (Path(args.cache) if args.cache else True))
    return recipe


def _run_build(args) -> int:
    from quantkit.builder import build, result_table

    recipe = _load_build_recipe(args)
    if args.events == "-" and args.json:
        raise QuantkitError("--events - and --json both want stdout; give --events a file")
    stream = sys.stderr if args.json or args.events == "-" else sys.stdout

    def report(cell) -> None:
        if not args.quiet:
            print(f"{cell.name}: {'cache hit' if cell.cache_hit else 'built'}, "
                  f"{'ok' if cell.ok else 'REJECTED artifacts'} -> {cell.out}", file=sys.stderr)

    with _events_stream(args.events) as events:
        result = build(recipe, executor=args.executor, ray_address=args.ray_address, progress=not args.quiet,
                       verbose=not args.quiet, events=events, on_cell=report)
    print(result_table(result), file=stream)
    if args.json:
        print(json.dumps([{"cell": c.name, "out": str(c.out), "ok": c.ok, "cache_hit": c.cache_hit, "key": c.key,
                           "verdicts": c.verdicts} for c in result.cells], indent=2))
    return result.exit_code


def _run_plan(args) -> int:
    from quantkit.builder import plan, plan_json, plan_table

    planned = plan(_load_build_recipe(args))
    print(plan_json(planned) if args.json else plan_table(planned))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantkit", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"quantkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_ship(sub)
    _add_bench(sub)
    _add_inspect(sub)
    _add_build(sub)
    return parser


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _verdict(a) -> str:
    if a.verdict == "unverified":
        return "not checked (--no-verify)"
    if a.accepted:
        allowed = a.tokenizer_check and a.tokenizer_check.get("allowed")
        return "PASS (tokenizer mismatch allowed)" if allowed else "PASS"
    return "REJECTED: " + "; ".join(f.split(" (")[0] if not f.startswith("tokenizer:") else "tokenizer mismatch"
                                    for f in a.failures)


def format_table(result) -> str:
    rows = [("artifact", "size", "bpw", "ppl", "dppl%", "KLD", "top-1", "gate")]
    if result.verified:
        ref = result.reference["metrics"]
        rows.append(("reference (transformers fp32)", "-", "-", _fmt(ref["perplexity"], ".3f"), "-", "-", "-", "-"))
    for a in result.artifacts:
        m = a.metrics or {}
        rows.append((a.path, f"{a.bytes / 2**20:.2f} MiB", f"{a.bits_per_weight:.2f}",
                     _fmt(m.get("perplexity"), ".3f"), _fmt(m.get("ppl_increase_pct"), "+.2f"),
                     _fmt(m.get("kld"), ".5f"), _fmt(m.get("top1"), ".4f"), _verdict(a)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1] for r in rows]
    lines += [f"note: {a.path}: {note}" for a in result.artifacts for note in a.notes]
    return "\n".join(lines)


def _method_options_help() -> str:
    """The --method-option keys, from the methods' typed configs (declared there, once)."""
    from quantkit.methods import METHODS
    from quantkit.methods.options import describe

    lines = [line for name, m in METHODS.items() for line in describe(name, m.config_class, frozenset(m.flagged))]
    return "\nmethod options (--method-option KEY=VALUE):\n" + "\n".join(f"  {line}" for line in lines) + "\n"


@contextlib.contextmanager
def _events_stream(target: str | None):
    """--events: nothing, stdout ('-'), or a file opened for the run (line-buffered JSON Lines)."""
    if target is None:
        yield None
    elif target == "-":
        yield sys.stdout
    else:
        try:
            stream = open(target, "w", encoding="utf-8")  # noqa: SIM115 - closed below, after the run
        except OSError as exc:
            raise QuantkitError(f"--events {target}: cannot write it ({exc.strerror}); pick a writable path") from None
        try:
            yield stream
        finally:
            stream.close()


def _run_ship(args) -> int:
    from quantkit.pipeline import ship
    from quantkit.recipe import Recipe

    recipe = Recipe(
        verify=args.verify, allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
        method=args.method, method_options=args.method_options, bits=args.bits, group_size=args.group_size,
        scheme=args.scheme,
        damp_percent=args.damp_percent, act_order=args.act_order, static_groups=args.static_groups,
        weighted_fit=args.weighted_fit, device=args.device, runtime=args.runtime,
        quantize_embeddings=args.quantize_embeddings, quantize_lm_head=args.quantize_lm_head,
        exclude=args.exclude, pure=args.pure, tensor_types=args.tensor_types,
        token_embedding_type=args.token_embedding_type, output_tensor_type=args.output_tensor_type,
        calib=args.calib, calib_samples=args.calib_samples, imatrix=args.imatrix, eval=args.eval,
        eval_samples=args.eval_samples, seq_len=args.seq_len, max_ppl_increase_pct=args.max_ppl_increase,
        max_kld=args.max_kld, min_top1=args.min_top1, target_bpw=args.target_bpw, max_size=args.max_size,
    )
    if args.events == "-" and args.json:
        raise QuantkitError("--events - and --json both want stdout; give --events a file")
    with _events_stream(args.events) as events:
        result = ship(args.model, args.targets, args.out, recipe, overwrite=args.overwrite,
                      progress=not args.quiet, verbose=not args.quiet, third_party_output=args.verbose, events=events,
                      cache=_cache(args.cache))
    table_stream = sys.stderr if args.json or args.events == "-" else sys.stdout
    print(format_table(result), file=table_stream)
    print(f"wrote {result.out_dir}/manifest.json", file=table_stream)
    if args.json:
        print(json.dumps(result.manifest, indent=2))
    if not result.ok:
        for line in rejection_report(result):
            print(line, file=sys.stderr)
        return 1
    if args.bench:
        _bench([str(result.out_dir)], args, args.bench_json, table_stream, args.bench_html)
    return 0


def _bench_options(args):
    from quantkit.bench import BenchOptions

    return BenchOptions(prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, threads=args.threads,
                        repetitions=args.repetitions, warmup=args.warmup, runtime=args.bench_runtime, pin=args.pin)


def _bench(inputs: list[str], args, json_path: str | None, stream=sys.stdout, html_path: str | None = None) -> None:
    from quantkit.bench import bench, table
    from quantkit.bench.devices import device_for

    options = _bench_options(args)
    device = device_for(args.bench_device, args.ssh_identity, args.remote_python)
    if html_path:
        _check_html_writable(Path(html_path))

    def progress(record: dict) -> None:
        w = record["workload"]
        print(f"benched {record['artifact']['name']} pp{w['prompt_tokens']}/tg{w['gen_tokens']}", file=sys.stderr)

    records = bench(inputs, options, Path(json_path) if json_path else None, on_measurement=progress,
                    device=device)
    print(table(records), file=stream)
    if json_path:
        print(f"wrote {json_path}", file=stream)
    if html_path:
        from quantkit.bench.html import write_html

        write_html(records, Path(html_path))
        print(f"wrote {html_path}", file=stream)


def _check_html_writable(path: Path) -> None:
    """Fail before measuring, not after: matplotlib present and the report's folder there."""
    from quantkit.errors import QuantkitError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QuantkitError("--html needs matplotlib; pip install 'quantkit[bench]'") from None
    if not path.parent.resolve().is_dir():
        raise QuantkitError(f"--html {path}: folder {path.parent} does not exist; create it or pick another path")


def _run_bench(args) -> int:
    _bench(args.artifacts, args, args.json, html_path=args.html)
    return 0


def _run_bench_compare(argv: list[str]) -> int:
    from quantkit.bench import compare, compare_table, read_jsonl

    p = argparse.ArgumentParser(prog="quantkit bench compare",
                                description="Flag regressions of NEW against OLD beyond their noise.")
    p.add_argument("old", metavar="OLD.jsonl")
    p.add_argument("new", metavar="NEW.jsonl")
    p.add_argument("--alpha", type=float, default=0.01, help="significance level of the test (default: 0.01)")
    p.add_argument("--min-change", type=float, default=10.0, metavar="PCT",
                   help="a significant slowdown is a regression only from this size on, in %% (default: 10; two "
                   "runs of one build drifted by up to 7 %% on this project's machine)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = p.parse_args(argv)
    findings = compare(read_jsonl(Path(args.old)), read_jsonl(Path(args.new)), args.alpha, args.min_change)
    print(json.dumps(findings, indent=2) if args.json else compare_table(findings))
    underpowered = [f for f in findings if f["underpowered"]]
    if underpowered:
        print(f"warning: {len(underpowered)} comparison(s) cannot reach p < {args.alpha} with so few repetitions "
              f"(smallest possible p {min(f['smallest_p'] for f in underpowered):.3f}); bench with more "
              "--repetitions (5 each reach 0.004)", file=sys.stderr)
    regressions = [f for f in findings if f["regression"]]
    if regressions:
        print(f"error: {len(regressions)} regression(s) beyond noise in {args.new}", file=sys.stderr)
        return 1
    return 0


def rejection_report(result) -> list[str]:
    """Why each rejected artifact was rejected, what the numbers mean, and what to try."""
    lines = [f"error: {len(result.rejected)} artifact(s) rejected and moved to {result.out_dir}/rejected/:"]
    for a in result.rejected:
        accuracy = [f for f in a.failures if not f.startswith(("tokenizer:", LOAD_FAILURE))]
        tokenizer = [f for f in a.failures if f.startswith("tokenizer:")]
        name = a.path.removeprefix("rejected/")
        for failure in (f for f in a.failures if f.startswith(LOAD_FAILURE)):
            lines.append(f"  {name} does not run in its runtime: {failure.removeprefix(LOAD_FAILURE).strip()}; "
                         "this is quantkit's fault or the runtime's: please report it")
        if accuracy:
            lines.append(f"  {name} failed its accuracy gate: " + "; ".join(accuracy))
            lines.append("    try: " + "; or ".join(a.remedies) + "; or relax the gate (--max-ppl-increase, "
                         "--max-kld, --min-top1) if this loss is acceptable")
        for failure in tokenizer:
            lines.append(f"  {name}: {failure.removeprefix('tokenizer:').strip()}")
    return lines


def _run_inspect(args) -> int:
    from quantkit.inspection import format_gguf, format_hf_folder, format_onnx_folder, inspect_artifact

    info, kind = inspect_artifact(args.artifact)
    formatter = {"gguf": format_gguf, "hf": format_hf_folder, "onnx": format_onnx_folder}[kind]
    print(json.dumps(info, indent=2) if args.json else formatter(info, args.tensors))
    return 0


INTERNAL_ERROR = 3


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "compare"]:
        try:
            return _run_bench_compare(argv[2:])
        except QuantkitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
    args = build_parser().parse_args(argv)
    from quantkit.quiet import third_party_quiet

    try:
        with third_party_quiet(enabled=not getattr(args, "verbose", False)):
            runners = {"ship": _run_ship, "bench": _run_bench, "inspect": _run_inspect, "build": _run_build,
                       "plan": _run_plan}
            return runners[args.command](args)
    except QuantkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to the output folder", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or a runtime's failure: one line here, the traceback in a log file
        log = _write_traceback()
        print(f"error: internal failure ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
              f"nothing was written to the output folder; details in {log}; please report it with that file",
              file=sys.stderr)
        return INTERNAL_ERROR


def _write_traceback() -> str:
    import tempfile
    import time
    import traceback

    handle, path = tempfile.mkstemp(prefix=f"quantkit-error-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
    with open(handle, "w") as f:
        f.write(f"quantkit {__version__}\nargv: {sys.argv}\n\n")
        traceback.print_exc(file=f)
    return path


if __name__ == "__main__":
    sys.exit(main())
