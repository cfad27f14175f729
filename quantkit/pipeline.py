"""The ship pipeline: load -> (calibrate) -> quantize -> export -> verify in the runtime -> manifest.

Everything is written into a temporary folder beside the output folder and moved into place only
when the run completes, so a failed run leaves the output folder as it was. Artifacts that fail
their accuracy gate are moved to ``OUT/rejected/`` and marked rejected in the manifest.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import torch

from quantkit import __version__
from quantkit.cache import BuildCache, CacheHit, folder_sha256, key_of, restore, run_key_inputs
from quantkit.calibrate import LinearStats, collect_statistics_streamed
from quantkit.checks import gate_for, score
from quantkit.data import TokenSamples, load_documents, make_samples
from quantkit.errors import ArtifactLoadError, QuantkitError, disk_full_error, is_disk_full
from quantkit.grids import Grid, IntGrid, QuantizedWeight
from quantkit.imatrix import (
    GGUF_FILENAME,
    ImportanceMatrix,
    from_statistics,
    gguf_weight_names,
    importance_for,
    load_imatrix_option,
    write_imatrix,
)
from quantkit.manifest import BackgroundHashes, KnownHashes, artifact_digest, environment, write_manifest
from quantkit.memory import bound_heap_growth
from quantkit.methods import METHODS, Method, RoundToNearest
from quantkit.model import ModelSource
from quantkit.quiet import third_party_quiet
from quantkit.recipe import Recipe, check_grid_fits, quantized_tensor_names
from quantkit.reference import Reference
from quantkit.resume import PassCheckpoint, discard, pass_folder
from quantkit.sequential import MIN_EXPERT_TOKENS, GridPlan, SequentialResult, quantize_sequential
from quantkit.streaming import BlockStreamer
from quantkit.targets.base import ExportContext, Quantizer, Rounding, Target
from quantkit.targets.registry import parse_target

REJECTED_DIR = "rejected"
# What users ship from a real model: llama.cpp's recommended 4-bit mix and its near-lossless 8-bit type.
DEFAULT_TARGETS = ("gguf:Q4_K_M", "gguf:Q8_0")
TOKENIZER_CHECK_CHARS = 200_000


@dataclass
class ArtifactResult:
    target: str
    path: str  # relative to the output folder
    bytes: int
    sha256: str
    bits_per_weight: float
    runtime: dict
    metrics: dict | None  # None: not checked (--no-verify)
    gate: dict | None
    verdict: str  # "accepted" | "rejected" | "unverified" (--no-verify: exported, nothing checked)
    failures: list[str]
    tokenizer_check: dict | None
    seconds: dict
    notes: list[str] = field(default_factory=list)
    remedies: list[str] = field(default_factory=list)  # what to try when rejected
    budget: dict | None = None  # GGUF under --target-bpw / --max-size: allocation and predicted loss

    @property
    def accepted(self) -> bool:
        return self.verdict != "rejected"


@dataclass
class ShipResult:
    """What ``quantkit ship`` produced; ``manifest`` is the content of manifest.json."""

    out_dir: Path
    manifest: dict
    artifacts: list[ArtifactResult] = field(default_factory=list)
    reference: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(a.accepted for a in self.artifacts)

    @property
    def rejected(self) -> list[ArtifactResult]:
        return [a for a in self.artifacts if not a.accepted]

    @property
    def verified(self) -> bool:
        return bool(self.reference)


EVENTS_SCHEMA = "quantkit.events/1"


class _Log:
    """Step messages for people (stderr) and, with ``events``, JSON Lines progress events for machines."""

    def __init__(self, enabled: bool, events: TextIO | None = None):
        self.enabled, self.events = enabled, events

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    def event(self, kind: str, **fields) -> None:
        if self.events is not None:
            line = {"schema": EVENTS_SCHEMA, "time": round(time.time(), 3), "event": kind, **fields}
            self.events.write(json.dumps(line) + "\n")
            self.events.flush()


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """One run at a time per output folder: an advisory lock on ``.<name>.lock`` beside it (the kernel drops it
    when the process dies, so a killed run leaves no stale lock); a second run is refused, not interleaved."""
    import fcntl

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = open(out.parent / f".{out.name}.lock", "a+")  # noqa: SIM115 - held for the whole run
    except OSError as exc:
        raise QuantkitError(f"cannot write to output folder {out} ({exc.strerror}); choose a writable --out") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QuantkitError(f"another quantkit run is writing {out}; wait for it to finish or choose another "
                                "--out") from None
        try:
            yield
        finally:
            Path(handle.name).unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def _prepare_output(out: Path, filenames: list[str], overwrite: bool) -> Path:
    """Check the output folder up front and create the temporary folder beside it."""
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"output path {out} exists and is not a folder; choose another --out")
    if out.is_dir() and not overwrite:
        clashes = [n for n in [*filenames, "manifest.json", REJECTED_DIR] if (out / n).exists()]
        if clashes:
            raise QuantkitError(f"{out / clashes[0]} already exists; choose another --out or pass --overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.quantkit-", dir=out.parent))
    except OSError as exc:
        raise QuantkitError(f"cannot write to output folder {out} ({exc.strerror}); choose a writable --out") from None


def _move_into_place(tmp: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for item in sorted(tmp.iterdir()):
        dest = out / item.name
        if item.name == REJECTED_DIR and dest.is_dir():
            _move_into_place(item, dest)  # keep other rejected artifacts of earlier runs
            item.rmdir()
            continue
        if dest.is_dir():
            shutil.rmtree(dest)  # an earlier run's folder artifact (only reached with --overwrite)
        item.replace(dest)


class WeightQuantizer(Quantizer):
    """Hands targets the recipe's quantized weights.

    Sequential methods (GPTQ, AWQ) quantize the whole model layer by layer once per grid (or per
    ``GridPlan``, when a file type puts some block linears on other grids), and targets sharing a
    grid or plan share the result. Embedding and lm_head have no per-layer statistics under a
    sequential method and are rounded to nearest, as is everything under ``rtn`` (with the run's
    importance matrix, if any), which targets may do row chunk by row chunk (``rounding``).
    """

    def __init__(self, source: ModelSource, method: Method, calib: TokenSamples | None, names: list[str],
                 log: _Log, progress: bool, device: torch.device | None = None, imatrix: str = "none",
                 imatrix_file: ImportanceMatrix | None = None, resume: Path | None = None):
        super().__init__(source)
        self.resume = resume  # where layer-by-layer passes save finished blocks (None: they do not)
        self.method, self.calib, self.log, self.progress = method, calib, log, progress
        self.device = device or torch.device("cpu")
        self.block_names = [n for i in range(source.n_layers) for n in source.arch.linear_weights(i) if n in names]
        self._stats: dict[str, LinearStats] | None = None
        self._by_grid: dict[Grid | GridPlan, SequentialResult] = {}
        self.imatrix_option, self.imatrix = imatrix, imatrix_file  # "calib": collected on first use
        self._prediction_imatrix: ImportanceMatrix | None = None  # for budgets in runs without an imatrix
        self._gguf_names = gguf_weight_names(source.arch, source.n_layers)

    def rounding(self, name: str, grid: Grid) -> Rounding | None:
        if self.imatrix_option != "none" and grid.uses_importance:  # the recipe allows it with rtn only
            return Rounding(importance_for(self.importance_matrix(), self._gguf_names.get(name, name),
                                           self.source.tensors[name].shape[1], self.imatrix_option))
        if self.method.sequential:
            return None if name in self.block_names else Rounding()
        return None if self.method.needs_statistics else Rounding()

    def quantize(self, name: str, grid: Grid, plan: GridPlan | None = None) -> QuantizedWeight:
        rounding = self.rounding(name, grid)
        if rounding is not None:
            return RoundToNearest().quantize_weight(self.source.load(name), grid, importance=rounding.importance)
        if self.method.sequential:
            return self._sequential(self._pass_key(grid, plan)).quantized[name].widened()
        return self.method.quantize_weight(self.source.load(name), grid, self._statistics().get(name))

    def replaced(self, name: str, grid: Grid | None, plan: GridPlan | None = None) -> torch.Tensor | None:
        """AWQ's rescaled norms from the pass for ``grid`` (or ``plan``)."""
        if grid is None or not self.method.sequential or not self.block_names:
            return None
        replaced = self._sequential(self._pass_key(grid, plan)).replaced.get(name)
        return None if replaced is None else replaced.float()

    def _pass_key(self, grid: Grid, plan: GridPlan | None) -> Grid | GridPlan:
        """What a layer-by-layer pass is cached under: the plan when it mixes grids, else the grid."""
        if plan is None or not plan.overrides:
            return grid
        return plan

    def _sequential(self, grid: Grid | GridPlan) -> SequentialResult:
        if grid not in self._by_grid:
            self.log.event("stage", stage="quantize", method=self.method.name, grid=grid.name)
            self.log(f"{self.method.name} on {grid.name}: layer by layer over {self.calib.n_tokens} tokens "
                     f"({self.device.type})")
            streamer = BlockStreamer(self.source, self.device)  # one block in memory at a time
            result = quantize_sequential(streamer.model, self.source.arch, self.calib.ids.to(self.device),
                                         self.block_names, grid, self.method.quantize_block, self.progress,
                                         label=self.method.name, streamer=streamer,
                                         on_block=lambda i, n: self.log.event("block", grid=grid.name, block=i,
                                                                              blocks=n),
                                         checkpoint=self._checkpoint(grid))
            result.replaced = {n: t.to("cpu") for n, t in result.replaced.items()}
            if result.expert_fallbacks:
                n = sum(len(v) for v in result.expert_fallbacks.values())
                self.log(f"{n} experts (over all blocks) saw fewer than {MIN_EXPERT_TOKENS} calibration tokens: "
                         "calibrated on every token of their block (GPTQ) or left unscaled and unclipped (AWQ)")
            self._by_grid[grid] = result
        return self._by_grid[grid]

    def _checkpoint(self, grid: Grid | GridPlan) -> PassCheckpoint | None:
        if self.resume is None:
            return None
        checkpoint = PassCheckpoint(pass_folder(self.resume, grid))
        if checkpoint.last_finished() >= 0:
            self.log(f"resuming {self.method.name} on {grid.name} after block {checkpoint.last_finished()} "
                     f"(saved by an earlier run of the same inputs)")
            self.log.event("resume", grid=grid.name, after_block=checkpoint.last_finished())
        return checkpoint

    @property
    def expert_fallbacks(self) -> dict[str, list[int]]:
        """Block index -> experts that fell back for too few routed tokens, over every pass so far."""
        found: dict[str, set[int]] = {}
        for result in self._by_grid.values():
            for block, experts in result.expert_fallbacks.items():
                found.setdefault(str(block), set()).update(experts)
        return {block: sorted(experts) for block, experts in sorted(found.items(), key=lambda kv: int(kv[0]))}

    def importance(self, name: str) -> torch.Tensor | None:
        """The run's importance matrix entry for ``name``; runs without one (GPTQ, AWQ, plain RTN under a
        budget) collect one from the calibration text on first use, for predictions only (rounding is unchanged)."""
        imatrix = self.importance_matrix() if self.imatrix_option != "none" else self._predicting_imatrix()
        if imatrix is None:
            return None
        return importance_for(imatrix, self._gguf_names.get(name, name), self.source.tensors[name].shape[1],
                              self.imatrix_option)

    def _predicting_imatrix(self) -> ImportanceMatrix | None:
        if self._prediction_imatrix is None and self.calib is not None:
            self._prediction_imatrix = self._collect_imatrix()
        return self._prediction_imatrix

    def _collect_imatrix(self) -> ImportanceMatrix:
        self.log.event("stage", stage="importance matrix", tokens=self.calib.n_tokens)
        self.log(f"importance matrix over {self.calib.n_tokens} calibration tokens")
        linears = [n for i in range(self.source.n_layers) for n in self.source.arch.linear_weights(i)]
        if not self.source.tied_embeddings:
            linears.append(self.source.arch.lm_head)  # output.weight is weighted too when a mix quantizes it
        stats = collect_statistics_streamed(self.source, self.calib, linears, self.progress, gram=False)
        return from_statistics(stats, self._gguf_names, self.calib.source, self.calib.ids.shape[1],
                               self.calib.ids.shape[0])

    def importance_matrix(self) -> ImportanceMatrix | None:
        """The run's importance matrix: the file's, or collected from the calibration text on first use
        (per-channel sums of squares only, by the same hooks as the other methods' statistics)."""
        if self.imatrix is None and self.imatrix_option == "calib":
            self.imatrix = self._collect_imatrix()
        return self.imatrix

    def _statistics(self) -> dict[str, LinearStats]:
        if self._stats is None:
            self.log.event("stage", stage="calibration statistics", tokens=self.calib.n_tokens)
            self.log(f"calibration statistics over {self.calib.n_tokens} tokens")
            self._stats = collect_statistics_streamed(self.source, self.calib, self.block_names, self.progress)
        return self._stats


def _tokenizer_texts(recipe: Recipe) -> list[str]:
    texts, total = [], 0
    for doc in load_documents(recipe.eval, "eval"):
        texts.append(doc[: TOKENIZER_CHECK_CHARS - total])
        total += len(texts[-1])
        if total >= TOKENIZER_CHECK_CHARS:
            break
    return texts


def ship(
    model: str | Path | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    out: str | Path = "quantkit-out",
    recipe: Recipe | None = None,
    overwrite: bool = False,
    progress: bool = True,
    verbose: bool = True,
    third_party_output: bool = False,
    events: TextIO | None = None,
    cache: BuildCache | None = None,
) -> ShipResult:
    """Quantize ``model`` for each target, check each artifact in its runtime, write a manifest.

    ``verbose``: our step messages; ``third_party_output``: let the libraries we drive print their warnings,
    logs and banners (hidden by default); ``events``: a text stream that gets JSON Lines progress events
    (schema quantkit.events/1: start, cache, stage, block, resume, artifact, done); ``cache``: a build cache
    (quantkit.cache) that an unchanged run is copied back from, and where an unfinished layer-by-layer pass
    is resumed from."""
    bound_heap_growth()
    log = _Log(verbose, events)
    with third_party_quiet(enabled=not third_party_output):
        try:
            result = _ship(model, targets, out, recipe, overwrite, progress, log, cache)
        except Exception as exc:
            log.event("failed", error=type(exc).__name__, message=str(exc).splitlines()[0] if str(exc) else "")
            raise
    log.event("done", ok=result.ok, manifest=str(result.out_dir / "manifest.json"),
              verdicts={a.target: a.verdict for a in result.artifacts})
    return result


@dataclass
class Preflight:
    """A run checked before any work: its model, targets, context and method, or a QuantkitError."""

    recipe: Recipe
    source: ModelSource
    targets: list[Target]
    ctx: ExportContext
    method: Method

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]


def preflight(model, targets: Sequence[str], recipe: Recipe | None = None, progress: bool = False) -> Preflight:
    """Everything ``ship`` checks before it starts working (and ``quantkit plan`` checks for each cell)."""
    recipe = recipe or Recipe()
    recipe.validate()
    parsed = [parse_target(t) for t in targets]
    if not parsed:
        raise QuantkitError("no targets given; pass e.g. --targets gguf:Q4_K_M,gguf:Q8_0")
    for target in parsed:
        target.configure(recipe)
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise QuantkitError(f"a target is listed twice in {', '.join(names)}; list each once")
    unbudgeted = [t.name for t in parsed if recipe.budgeted and not t.takes_budget]
    if unbudgeted:
        raise QuantkitError(f"--target-bpw / --max-size choose per-tensor types of gguf and hf-gptq targets; "
                            f"{unbudgeted[0]} cannot take a budget; ship it in a run without one")
    source = ModelSource(model)
    quantized = quantized_tensor_names(source, recipe)
    for target in parsed:  # GGUF types fix their own blocks; integer grids take --group-size (or are per channel)
        grid = target.grid(recipe)
        if isinstance(grid, IntGrid) and grid.group_size > 0:
            check_grid_fits(source, quantized, grid, f"--group-size {grid.group_size} (the grid of {target.name})")
    ctx = ExportContext(source, recipe, quantized, progress=progress)
    method = METHODS[recipe.method].from_recipe(recipe)
    for target in parsed:
        target.validate(ctx)
        grid = target.grid(recipe)
        reason = grid and method.unsupported(grid)
        if reason:
            raise QuantkitError(f"--method {recipe.method} with {target.name}: {reason}; use --method rtn or awq")
    return Preflight(recipe, source, parsed, ctx, method)


def _ship(model, targets, out, recipe: Recipe | None, overwrite: bool, progress: bool, log: _Log,
          cache: BuildCache | None = None) -> ShipResult:
    started = time.time()
    checked = preflight(model, targets, recipe, progress)
    recipe, source, parsed, ctx, method = checked.recipe, checked.source, checked.targets, checked.ctx, checked.method
    names = checked.target_names
    log.event("start", model=str(model) if model else "embedded", targets=names, method=recipe.method)
    out = Path(out)
    extra = [GGUF_FILENAME] if recipe.imatrix == "calib" else []
    key = CacheKey.of(cache, source, recipe, names) if cache is not None else None
    with _output_lock(out), (cache.lock(key.key) if key else contextlib.nullcontext()):
        tmp = _prepare_output(out, [t.filename() for t in parsed] + extra, overwrite)
        hit = key.lookup(log) if key else None
        if hit is not None:
            try:
                result = _restored(hit, tmp, out)
                _move_into_place(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return result
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.scratch-", dir=out.parent))  # never moved into --out
        # the manifest's weight hashes: known already under a cache, else read while the run works
        weight_hashes = key.weight_hashes(source) if key else source.weight_sha256_in_background()
        try:
            result = _run(source, recipe, method, parsed, ctx, tmp, scratch, out, log, progress, started,
                          weight_hashes, key)
            if key:
                key.store(tmp)
            _move_into_place(tmp, out)
        except Exception as exc:  # OSError, or a native writer's error that says the same in words
            if is_disk_full(exc):  # the user's to fix: name the path and the room the run needs
                raise disk_full_error(exc, out, tmp, _expected_bytes(source, recipe, parsed)) from None
            raise
        finally:
            weight_hashes.cancel()  # after a failure: stop reading the checkpoint (a no-op once finished)
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)
    return result


def _expected_bytes(source: ModelSource, recipe: Recipe, targets: list[Target]) -> int:
    """Roughly what a run writes: each artifact at its nominal bits per weight over every parameter."""
    return int(sum(t.bits_per_weight(recipe) for t in targets) * source.parameter_count / 8)


@dataclass
class CacheKey:
    """A run's key in a build cache, and what the run does with it."""

    cache: BuildCache
    key: str
    inputs: dict

    @classmethod
    def of(cls, cache: BuildCache, source: ModelSource, recipe: Recipe, targets: list[str]) -> CacheKey:
        model_files = folder_sha256(source.path, cache.file_hashes)
        # "auto" resolved: a GPU run (fp32 on another device) is not the CPU run's bytes
        resolved = {**recipe.to_dict(), "device": recipe.torch_device().type}
        inputs = run_key_inputs(model_files, resolved, targets, cache.file_hashes)
        cache.file_hashes.save()
        return cls(cache, key_of(inputs), inputs)

    def lookup(self, log: _Log) -> CacheHit | None:
        hit, damaged = self.cache.lookup(self.key)
        if damaged:
            log(f"cache entry {self.key[:12]} is damaged ({damaged}); removed, rebuilding")
        log.event("cache", key=self.key, hit=hit is not None, damaged=damaged)
        if hit:
            log(f"cache hit {self.key[:12]}: copying the artifacts and manifest of an identical earlier run "
                f"from {self.cache.root} (nothing quantized or evaluated)")
        return hit

    def weight_hashes(self, source: ModelSource) -> KnownHashes:
        files = self.inputs["model"]
        return KnownHashes({f.name: files[f.relative_to(source.path).as_posix()] for f in source.weight_files})

    @property
    def resume(self) -> Path:
        return self.cache.resume_dir(self.key)

    def manifest_entry(self) -> dict:
        return {"key": self.key, "hit": False}

    def store(self, tmp: Path) -> None:
        self.cache.store(self.key, tmp, sorted(p.name for p in tmp.iterdir()), self.inputs)
        discard(self.resume)


def _restored(hit: CacheHit, tmp: Path, out: Path) -> ShipResult:
    """A cache entry copied into the run's temporary folder; its manifest says it came from the cache."""
    restore(hit, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["cache"] = {"key": hit.key, "hit": True}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    artifacts = [ArtifactResult(**a) for a in manifest["artifacts"]]
    return ShipResult(out_dir=out, manifest=manifest, artifacts=artifacts, reference=manifest.get("reference") or {})


def _run(source: ModelSource, recipe: Recipe, method: Method, targets: list[Target], ctx: ExportContext, tmp: Path,
         scratch: Path, out: Path, log: _Log, progress: bool, started: float,
         weight_hashes: BackgroundHashes | KnownHashes, key: CacheKey | None = None) -> ShipResult:
    log(f"model: {source.path} ({source.arch.hf_class}, {source.parameter_count / 1e6:.1f}M parameters)")
    imatrix_file = load_imatrix_option(recipe.imatrix, source, ctx.quantized_names)  # a bad file fails first
    needs_calibration = method.needs_statistics or recipe.imatrix == "calib" or recipe.budgeted
    tokenizer = source.tokenizer() if recipe.verify or needs_calibration else None
    samples = make_samples(tokenizer, recipe.eval, "eval", recipe.eval_samples, recipe.seq_len) \
        if recipe.verify else None
    calib, calibration = None, None
    if needs_calibration:
        calib = make_samples(tokenizer, recipe.calib, "calib", recipe.calib_samples, recipe.seq_len)
        calibration = {"source": calib.source, "samples": calib.ids.shape[0], "seq_len": recipe.seq_len,
                       "tokens": calib.n_tokens, "ids_sha256": calib.sha256}
    quantizer = WeightQuantizer(source, method, calib, ctx.quantized_names, log, progress, recipe.torch_device(),
                                recipe.imatrix, imatrix_file, resume=key.resume if key else None)
    ctx = replace(ctx, quantizer=quantizer)  # the validated context, now with the run's weights
    reference = None
    if recipe.verify:
        log.event("stage", stage="reference", tokens=samples.n_tokens)
        log(f"reference: {source.arch.hf_class} in transformers (fp32, block by block) on {samples.n_tokens} tokens")
        reference = Reference(source, samples, scratch, progress)
        log(f"reference perplexity {reference.metrics.perplexity:.3f}")
    else:
        log("--no-verify: artifacts are exported but not checked in any runtime")
    try:
        check = Check(samples, reference, tokenizer, _tokenizer_texts(recipe), progress) if reference else None
        artifacts = [_ship_one(target, ctx, tmp, check, log) for target in targets]
    finally:
        if reference:
            reference.close()
    imatrix = _imatrix_entry(recipe, quantizer, tmp)
    if calibration is not None and quantizer.expert_fallbacks:
        calibration["experts_on_all_tokens"] = {"min_tokens": MIN_EXPERT_TOKENS, "blocks": quantizer.expert_fallbacks}

    ref_entry = {"runtime": "transformers (torch fp32)", "metrics": reference.metrics.to_dict()} if reference else {}
    result = ShipResult(out_dir=out, manifest={}, artifacts=artifacts, reference=ref_entry)
    eval_entry = None if samples is None else {
        "source": samples.source, "samples": samples.ids.shape[0], "seq_len": recipe.seq_len,
        "tokens": samples.n_tokens, "ids_sha256": samples.sha256}
    result.manifest = write_manifest(
        tmp / "manifest.json",
        quantkit_version=__version__,
        model=_model_entry(source, weight_hashes.result()),
        recipe=recipe.to_dict(),
        verified=recipe.verify,
        data={"eval": eval_entry, "calibration": calibration, "imatrix": imatrix},
        reference=result.reference or None,
        artifacts=artifacts,
        environment=environment(),
        seconds=round(time.time() - started, 1),
        **({"cache": key.manifest_entry()} if key else {}),
    )
    return result


@dataclass
class Check:
    """What checking an artifact needs: evaluation rows, the reference, and texts for the tokenizer check."""

    samples: TokenSamples
    reference: Reference
    tokenizer: object
    texts: list[str]
    progress: bool


def _ship_one(target: Target, ctx: ExportContext, tmp: Path, check: Check | None, log: _Log) -> ArtifactResult:
    path = tmp / target.filename()
    log(f"{target.name}: exporting {path.name}")
    log.event("artifact", target=target.name, phase="export")
    t0 = time.time()
    report = target.export(ctx, path)
    t1 = time.time()
    log.event("artifact", target=target.name, phase="exported", seconds=round(t1 - t0, 2))
    bpw = report.bits_per_weight or target.bits_per_weight(ctx.recipe)
    metrics, gate, failures, tokenizer_check = None, None, [], None
    if check is None:  # --no-verify: no score, but an artifact its runtime cannot open is never shipped
        log(f"{target.name}: opening it in {target.runtime()['name']} (--no-verify: a load check, no scoring)")
        reason = target.load_failure(path, ctx.recipe.seq_len)
        if reason:
            failures.append(load_failure_text(target, path, reason))
    else:
        log(f"{target.name}: checking in {target.runtime()['name']}")
        try:
            tokenizer_check = target.verify_tokenizer(path, check.tokenizer, check.texts)
            metrics = score(check.samples.ids, target.logits(path, check.samples.ids, check.progress),
                            check.reference, check.reference.metrics.perplexity)
        except ArtifactLoadError as exc:  # a file its runtime refuses: rejected like one that fails its gate
            failures.append(load_failure_text(target, path, str(exc)))
        else:
            gate = gate_for(bpw, ctx.recipe.gate_overrides())
            failures = [f"{text} ({EXPLAINED[text.split()[0]]})" for text in gate.failures(metrics)]
            if tokenizer_check is not None and not tokenizer_check["match"]:
                tokenizer_check["allowed"] = ctx.recipe.allow_tokenizer_mismatch
                if not ctx.recipe.allow_tokenizer_mismatch:
                    failures.append(tokenizer_failure(tokenizer_check, target.runtime()["name"].split(" (")[0]))
    t2 = time.time()
    relative = Path(target.filename())
    if failures:
        (tmp / REJECTED_DIR).mkdir(exist_ok=True)
        relative = Path(REJECTED_DIR) / target.filename()
        path.replace(tmp / relative)
        path = tmp / relative
    size, digest = artifact_digest(path)
    verdict = "rejected" if failures else "unverified" if check is None else "accepted"
    log.event("artifact", target=target.name, phase="checked", verdict=verdict, path=relative.as_posix(),
              metrics=None if metrics is None else metrics.to_dict(), failures=failures)
    return ArtifactResult(
        target=target.name,
        path=relative.as_posix(),
        bytes=size,
        sha256=digest,
        bits_per_weight=round(bpw, 4),
        runtime=target.runtime(),
        metrics=None if metrics is None else metrics.to_dict(),
        gate=None if gate is None else gate.to_dict(),
        verdict=verdict,
        failures=failures,
        tokenizer_check=tokenizer_check,
        seconds={"export": round(t1 - t0, 2), "verify": round(t2 - t1, 2)},
        notes=list(report.notes),
        budget=report.budget,
        remedies=target.remedies(ctx.recipe) if failures else [],
    )


# What each gate metric means, for the failure lines.
EXPLAINED = {
    "ppl": "perplexity on the evaluation text, relative to the unquantized model",
    "KLD": "mean KL divergence of the next-token distribution from the unquantized model's",
    "top-1": "share of positions whose most likely next token is the unquantized model's",
}
TOKENIZER_FAILURE = "tokenizer:"
LOAD_FAILURE = "load:"


def load_failure_text(target: Target, path: Path, reason: str) -> str:
    return f"{LOAD_FAILURE} {target.runtime()['name']} cannot run {path.name} ({reason})"


def tokenizer_failure(check: dict, runtime: str) -> str:
    first = check.get("first_mismatch") or {}
    return (f"{TOKENIZER_FAILURE} {runtime} tokenizes {check['mismatched_texts']} of {check['texts']} texts "
            f"differently from tokenizer.json (no {runtime} pre-tokenizer reproduces its split rules); first "
            f"difference in {first.get('text', '')!r}: tokenizer.json {first.get('hf', [])} vs runtime "
            f"{first.get('runtime', [])}; not an accuracy failure: the numbers above are on tokenizer.json's ids. "
            "Pass --allow-tokenizer-mismatch to ship it anyway (recorded in the manifest)")


def _imatrix_entry(recipe: Recipe, quantizer: WeightQuantizer, tmp: Path) -> dict | None:
    """The manifest's record of the importance matrix; a collected one is written for llama-quantize."""
    if recipe.imatrix == "none":
        return None
    matrix = quantizer.importance_matrix()
    entry = {"source": recipe.imatrix, "entries": len(matrix.entries), "path": None}
    if recipe.imatrix == "calib":
        path = write_imatrix(matrix, tmp / GGUF_FILENAME)
        entry["path"] = GGUF_FILENAME
    else:
        path = Path(recipe.imatrix)
    size, digest = artifact_digest(path)
    entry.update(bytes=size, sha256=digest)
    return entry


def _model_entry(source: ModelSource, weights_sha256: dict[str, str]) -> dict:
    return {
        "path": "<embedded default model>" if source.is_default else str(source.path.resolve()),
        "architecture": source.arch.name,
        "hf_class": source.arch.hf_class,
        "parameters": source.parameter_count,
        "tied_embeddings": source.tied_embeddings,
        "weights_sha256": weights_sha256,
    }

