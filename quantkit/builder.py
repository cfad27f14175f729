"""Recipe files for build systems: ``quantkit build RECIPE.toml`` runs a matrix of models x quantization
settings, each cell one ship run with its targets, through the build cache; ``quantkit plan`` says what
would run and what is cached, touching nothing.

    [build]
    out = "dist"                        # relative to the recipe file; a cell writes OUT/<model>/<quant>/
    targets = ["gguf:Q4_K_M", "onnx"]   # every cell's targets unless its [quant.*] table lists its own
    cache = true                        # true: the default cache folder; false; or a folder

    [models]
    embedded = "embedded"               # the model inside quantkit
    smollm2 = "models/smollm2"          # a local Hugging Face folder, relative to the recipe file

    [quant.gptq]                        # any field of quantkit.Recipe (the flags of quantkit ship)
    method = "gptq"
    group_size = 64

Every key and value is checked against the typed configs before any work; a mistake is one line naming
the file, the table and the key.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from quantkit.errors import QuantkitError
from quantkit.recipe import Recipe

EMBEDDED = "embedded"
BUILD_KEYS = {"out": str, "targets": list, "cache": (bool, str), "cpus_per_cell": (int, float),
              "memory_gb_per_cell": (int, float), "gpus_per_cell": (int, float)}
# Recipe fields that name files: relative to the recipe file, like model paths
PATH_FIELDS = {"calib": ("builtin",), "eval": ("builtin",), "imatrix": ("none", "calib")}
EXECUTORS = ("local", "ray")


class RecipeError(QuantkitError):
    """A recipe file that cannot run: the message names the file, the table and the key."""


@dataclass(frozen=True)
class Cell:
    """One model x one quantization setting: one ship run with its targets into its own folder."""

    model_name: str
    model: str | None  # a folder, or None for the embedded model
    quant_name: str
    recipe: Recipe
    targets: tuple[str, ...]
    out: Path

    @property
    def name(self) -> str:
        return f"{self.model_name}/{self.quant_name}"


@dataclass
class BuildRecipe:
    path: Path
    out: Path
    cells: list[Cell]
    cache: Path | bool  # True: the default cache folder
    resources: dict[str, float] = field(default_factory=dict)  # Ray: num_cpus, memory (bytes), num_gpus

    def open_cache(self):
        from quantkit.api import open_cache

        return open_cache(self.cache)


def load_recipe(path: str | Path) -> BuildRecipe:
    """Parse and check a recipe file (types, unknown keys, each cell's recipe and targets by name)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist; pass the path of a .toml recipe") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe file {path} ({exc}); check the path and its encoding") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path} is not valid TOML ({exc}); fix the syntax") from None
    where = _Where(path)
    _known_keys(where, "the top level", data, {"build", "models", "quant"})
    build = _table(where, data, "build", required=False)
    _known_keys(where, "[build]", build, set(BUILD_KEYS))
    for key, kinds in BUILD_KEYS.items():
        if key in build and not _is(build[key], kinds):
            raise RecipeError(where(f"[build] {key}", f"has the wrong type ({type(build[key]).__name__})"))
    default_targets = _targets(where, "[build] targets", build.get("targets"))
    models = _table(where, data, "models")
    quants = _table(where, data, "quant")
    base = path.resolve().parent  # absolute: Ray workers need not share this process's working folder
    out = Path(os.path.normpath(base / build.get("out", "quantkit-build")))
    cells = []
    for model_name, model in models.items():
        if not isinstance(model, str):
            raise RecipeError(where(f"[models] {model_name}", "must be a folder path or \"embedded\""))
        model_path = None if model == EMBEDDED else str(base / model)
        for quant_name, settings in quants.items():
            if not isinstance(settings, dict):
                raise RecipeError(where(f"quant.{quant_name}", "must be a table ([quant.NAME])"))
            recipe, targets = _cell_recipe(where, quant_name, settings, default_targets, base)
            cells.append(Cell(model_name, model_path, quant_name, recipe, targets, out / model_name / quant_name))
    cache = build.get("cache", True)
    return BuildRecipe(path, out, cells, base / cache if isinstance(cache, str) else cache, _resources(build))


class _Where:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, place: str, problem: str) -> str:
        return f"{self.path}: {place} {problem}"


def _table(where: _Where, data: dict, name: str, required: bool = True) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise RecipeError(where(f"[{name}]", "must be a table"))
    if required and not value:
        raise RecipeError(where(f"[{name}]", "is missing or empty; see examples/recipe.toml"))
    return value


def _known_keys(where: _Where, place: str, table: dict, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(allowed))}"
            raise RecipeError(where(f"{place} key {key!r}", f"is unknown; {hint}"))


def _is(value: object, kinds) -> bool:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def _targets(where: _Where, place: str, value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise RecipeError(where(place, "must be a non-empty list of target names, e.g. [\"gguf:Q4_K_M\", \"onnx\"]"))
    from quantkit.targets.registry import parse_target

    for spec in value:
        try:
            parse_target(spec)
        except QuantkitError as exc:
            raise RecipeError(where(place, f"holds a bad target: {exc}")) from None
    return tuple(value)


def _recipe_types() -> dict[str, object]:
    return typing.get_type_hints(Recipe)


def _matches(value: object, hint: object) -> bool:
    """Whether a TOML value fits a Recipe field's annotation (int for float allowed, bool never for int)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else False


def _type_name(hint: object) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _cell_recipe(where: _Where, name: str, settings: dict, default_targets: tuple[str, ...] | None,
                 base: Path) -> tuple[Recipe, tuple[str, ...]]:
    place = f"[quant.{name}]"
    hints = _recipe_types()
    _known_keys(where, place, settings, set(hints) | {"targets"})
    values = {}
    for key, value in settings.items():
        if key == "targets":
            continue
        if not _matches(value, hints[key]):
            raise RecipeError(where(f"{place} {key}", f"must be {_type_name(hints[key])}, not {value!r}"))
        values[key] = float(value) if hints[key] in (float, float | None) and isinstance(value, int) else value
    for key, keywords in PATH_FIELDS.items():
        if key in values and values[key] not in keywords:
            values[key] = str(base / values[key])
    targets = _targets(where, f"{place} targets", settings.get("targets")) or default_targets
    if targets is None:
        raise RecipeError(where(place, "has no targets; list them in [build] targets or in this table"))
    recipe = Recipe(**values)
    try:
        recipe.validate()
    except QuantkitError as exc:
        raise RecipeError(where(place, f"is invalid: {exc}")) from None
    return recipe, targets


def _resources(build: dict) -> dict[str, float]:
    return {"num_cpus": build.get("cpus_per_cell", 2), "num_gpus": build.get("gpus_per_cell", 0),
            "memory": int(build.get("memory_gb_per_cell", 8) * 2**30)}


# ---- plan ------------------------------------------------------------------------------------------

@dataclass
class PlannedCell:
    cell: Cell
    key: str | None  # None without a cache
    cached: bool


def plan(recipe: BuildRecipe | str | Path) -> list[PlannedCell]:
    """Each cell checked as ``ship`` would check it (model, targets, method), with its cache key and whether
    the cache holds it; nothing is quantized, evaluated or written outside the cache's file-hash memo."""
    from quantkit.pipeline import preflight

    recipe = recipe if isinstance(recipe, BuildRecipe) else load_recipe(recipe)
    cache = recipe.open_cache()
    planned = []
    for cell in recipe.cells:
        try:
            checked = preflight(cell.model, cell.targets, cell.recipe)
        except QuantkitError as exc:
            raise RecipeError(f"{recipe.path}: cell {cell.name}: {exc}") from None
        if cache is None:
            planned.append(PlannedCell(cell, None, False))
            continue
        from quantkit.pipeline import CacheKey

        key = CacheKey.of(cache, checked.source, checked.recipe, checked.target_names)
        planned.append(PlannedCell(cell, key.key, cache.holds(key.key)))
    return planned


# ---- build -----------------------------------------------------------------------------------------

@dataclass
class CellResult:
    """One cell's outcome: where it wrote, whether the cache answered, each artifact's verdict."""

    model: str
    quant: str
    out: Path
    ok: bool
    cache_hit: bool
    key: str | None
    verdicts: dict[str, str]
    manifest: dict

    @property
    def name(self) -> str:
        return f"{self.model}/{self.quant}"


@dataclass
class BuildResult:
    cells: list[CellResult]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cells)

    @property
    def exit_code(self) -> int:
        """0 every artifact accepted, 1 an accuracy gate (or tokenizer check) failed."""
        return 0 if self.ok else 1


def build(recipe: BuildRecipe | str | Path, *, executor: str = "local", ray_address: str | None = None,
          progress: bool = False, verbose: bool = False, events: TextIO | None = None,
          on_cell: Callable[[CellResult], None] | None = None) -> BuildResult:
    """Run every cell of ``recipe`` (each checked first, before any cell works) on ``executor``: "local"
    (one after another here) or "ray" (one Ray task per cell with the recipe's per-cell resources)."""
    if executor not in EXECUTORS:
        raise QuantkitError(f"--executor {executor!r} is unknown; use one of {', '.join(EXECUTORS)}")
    recipe = recipe if isinstance(recipe, BuildRecipe) else load_recipe(recipe)
    plan(recipe)  # every cell checked before any works
    if executor == "ray":
        results = _build_on_ray(recipe, ray_address, on_cell)
    else:
        results = []
        for cell in recipe.cells:
            result = run_cell(cell, recipe.cache, progress=progress, verbose=verbose, events=events)
            if on_cell:
                on_cell(result)
            results.append(result)
    return BuildResult(results)


def run_cell(cell: Cell, cache: Path | bool, progress: bool = False, verbose: bool = False,
             events: TextIO | None = None) -> CellResult:
    """One cell through ``ship`` with the build cache (its folder is the cell's own: rebuilt in place)."""
    from quantkit.api import open_cache
    from quantkit.pipeline import ship

    result = ship(cell.model, list(cell.targets), cell.out, cell.recipe, overwrite=True, progress=progress,
                  verbose=verbose, events=events, cache=open_cache(cache))
    entry = result.manifest.get("cache") or {}
    return CellResult(cell.model_name, cell.quant_name, cell.out, result.ok, bool(entry.get("hit")), entry.get("key"),
                      {a.target: a.verdict for a in result.artifacts}, result.manifest)


def _build_on_ray(recipe: BuildRecipe, address: str | None, on_cell) -> list[CellResult]:
    try:
        import ray
    except ImportError:
        raise QuantkitError("--executor ray needs Ray; pip install 'quantkit[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(**recipe.resources)(run_cell)
        pending = {task.remote(cell, recipe.cache): cell for cell in recipe.cells}
        done: dict[str, CellResult] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell = pending.pop(ref)
                done[cell.name] = ray.get(ref)
                if on_cell:
                    on_cell(done[cell.name])
        return [done[cell.name] for cell in recipe.cells]
    finally:
        if started_here:
            ray.shutdown()


def plan_table(planned: list[PlannedCell]) -> str:
    rows = [("cell", "targets", "out", "cache")]
    for p in planned:
        state = "no cache" if p.key is None else ("cached " if p.cached else "to build ") + p.key[:12]
        rows.append((p.cell.name, ",".join(p.cell.targets), str(p.cell.out), state))
    return _columns(rows)


def plan_json(planned: list[PlannedCell]) -> str:
    return json.dumps([{"cell": p.cell.name, "model": p.cell.model or EMBEDDED, "targets": list(p.cell.targets),
                        "out": str(p.cell.out), "key": p.key, "cached": p.cached,
                        "recipe": p.cell.recipe.to_dict()} for p in planned], indent=2)


def result_table(result: BuildResult) -> str:
    rows = [("cell", "cache", "verdicts")]
    for c in result.cells:
        rows.append((c.name, "hit" if c.cache_hit else "built",
                     ", ".join(f"{t}: {v}" for t, v in c.verdicts.items())))
    return _columns(rows)


def _columns(rows: list[tuple[str, ...]]) -> str:
    """Rows as left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)

