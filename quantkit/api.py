"""Python API for build systems: ``quantkit.ship(...) -> ShipResult``.

    import quantkit
    result = quantkit.ship(targets=["gguf:Q4_0"], out="dist/model")
    if not result.ok: ...
    result.manifest["artifacts"][0]["metrics"]["kld"]

Bad input raises ``QuantkitError``; artifacts that fail their gate are reported in the result
(``result.ok`` is False, ``result.rejected`` lists them) rather than raised, so a caller can decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TextIO

from quantkit.pipeline import DEFAULT_TARGETS, ShipResult
from quantkit.pipeline import ship as _ship
from quantkit.recipe import Recipe

RECIPE_FIELDS = frozenset(f.name for f in fields(Recipe))


def ship(
    model: str | Path | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    out: str | Path = "quantkit-out",
    *,
    overwrite: bool = False,
    progress: bool = False,
    verbose: bool = False,
    third_party_output: bool = False,
    events: TextIO | None = None,
    cache: str | Path | bool = False,
    **recipe: object,
) -> ShipResult:
    """Run the ship pipeline. ``recipe`` takes the fields of :class:`quantkit.Recipe`
    (method, bits, group_size, scheme, calib, eval, eval_samples, seq_len, max_kld, verify, ...).
    ``verbose`` prints our step messages; ``third_party_output`` lets the libraries quantkit drives print theirs;
    ``events`` (a text stream) receives JSON Lines progress events; ``cache``: True (the default cache folder)
    or a folder: unchanged runs are copied back from it and killed GPTQ/AWQ passes resume (see quantkit.cache)."""
    unknown = set(recipe) - RECIPE_FIELDS
    if unknown:
        raise TypeError(f"unknown recipe options {sorted(unknown)}; valid: {sorted(RECIPE_FIELDS)}")
    return _ship(model, targets, out, Recipe(**recipe), overwrite=overwrite, progress=progress, verbose=verbose,
                 third_party_output=third_party_output, events=events, cache=open_cache(cache))


def open_cache(cache: str | Path | bool | None):
    """The API's ``cache=`` argument as a BuildCache: False/None none, True the default folder, else that folder."""
    if cache is None or cache is False:
        return None
    from quantkit.cache import BuildCache

    return BuildCache(None if cache is True else Path(cache))
