"""``--method-option KEY=VALUE``: a method's typed config (a frozen dataclass) is the one declaration of
its options; the CLI, the Python API and recipes parse and check values against its fields.

Each field carries ``metadata["help"]``; ``describe`` turns that into the CLI's and README's list.
"""

from __future__ import annotations

import dataclasses
import typing

from quantkit.errors import QuantkitError

TRUE, FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def option_fields(config_class: type | None, flagged: frozenset[str] = frozenset()) -> dict[str, tuple[type, str]]:
    """Field name -> (type, help) of the options a config takes (fields with their own CLI flag excluded)."""
    if config_class is None:
        return {}
    hints = typing.get_type_hints(config_class)
    return {f.name: (hints[f.name], f.metadata.get("help", "")) for f in dataclasses.fields(config_class)
            if f.name not in flagged}


def _coerce(text: str, kind: type, spec: str):
    if kind is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise QuantkitError(f"--method-option {spec!r}: {text!r} is not a boolean; use true or false")
    try:
        return kind(text)
    except ValueError:
        raise QuantkitError(f"--method-option {spec!r}: {text!r} is not {'an' if kind is int else 'a'} "
                            f"{kind.__name__}") from None


def parse_method_options(method: str, config_class: type | None, specs: list[str],
                         flagged: dict[str, str] | None = None) -> dict[str, object]:
    """``KEY=VALUE`` strings (values already typed, as the Python API may pass them, are accepted too) checked
    against ``config_class``'s fields; ``flagged`` maps fields set by their own flag to that flag."""
    flagged = flagged or {}
    fields = option_fields(config_class, frozenset(flagged))
    options: dict[str, object] = {}
    for spec in specs:
        key, sep, value = str(spec).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise QuantkitError(f"--method-option {spec!r} is not KEY=VALUE; write e.g. 'n_grid=10'")
        if key in flagged:
            raise QuantkitError(f"--method-option {spec!r}: {method}'s {key} has its own flag; use {flagged[key]}")
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise QuantkitError(f"--method-option {spec!r}: {method} has no option {key!r} (its options: {known})")
        options[key] = _coerce(value.strip(), fields[key][0], spec)
    return options


def build_config(method: str, config_class: type, base: dict, options: dict[str, object]):
    """The config from the flags' values and the options, its own checks turned into one clear line."""
    try:
        return config_class(**{**base, **options})
    except ValueError as exc:
        raise QuantkitError(f"--method-option for {method}: {exc}") from None


def describe(method: str, config_class: type | None, flagged: frozenset[str] = frozenset()) -> list[str]:
    """One line per option: ``method: key (type, default D): help``."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)} if config_class else {}
    return [f"{method}: {key} ({kind.__name__}, default {defaults[key]}): {text}"
            for key, (kind, text) in option_fields(config_class, flagged).items()]
