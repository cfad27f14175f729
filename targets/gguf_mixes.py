"""llama.cpp's GGUF file types as data: a base type, per-tensor rules, and the user's overrides.

A file type (Q4_0, Q2_K, Q4_K_M, ...) decides the type of every matrix the way llama.cpp's quantizer
(``llama_tensor_get_type`` in src/llama-quant.cpp) does for the same LLAMA_FTYPE: the output projection
(and a tied token embedding) in Q6_K, more bits for attention-v / ffn-down / attention-output in some
layers, everything else in the base type. ``pure`` drops the rules (llama-quantize --pure); overrides
by name pattern come first, as llama-quantize's --tensor-type / --token-embedding-type /
--output-tensor-type do. Rows that do not fit a type's blocks fall back as llama.cpp does.

Only the rules of the architectures quantkit exports are kept (no Falcon, no IQ types); a fused q/k/v
matrix (Phi-3's attn_qkv) follows attn_v's rules and the experts' stacks (ffn_down_exps, ...) their dense
role's, as in llama.cpp, which also spends more bits on attention in 8-expert models (``EIGHT_EXPERTS``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from quantkit.errors import QuantkitError
from quantkit.grids.gguf_types import GGUF_TYPES

# the tensor types, their blocks and fallbacks: quantkit's GGUF type registry
FLOAT_TYPES = tuple(t.name for t in GGUF_TYPES.values() if t.is_float)
QUANT_TYPES = tuple(t.name for t in GGUF_TYPES.values() if not t.is_float)
# llama-quantize accepts these k-quant names as aliases of the _M mixes; so do we
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def block_size(type_name: str) -> int:
    return GGUF_TYPES[type_name].block


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's rules look at besides the tensor's own name and shape."""

    n_layers: int
    gqa: int = 1  # query heads per KV head
    tied: bool = False  # no output.weight: the token embedding is the output projection
    size_70b: bool = False
    imatrix: bool = False  # an importance matrix is used (some rules depend on it)
    n_expert: int = 0  # experts per mixture-of-experts layer (0: a dense model)


# (layer index, model facts) -> type, or None for the base type
LayerRule = Callable[[int, ModelFacts], str | None]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _more_bits_to(target: str) -> LayerRule:
    return lambda i, m: target if use_more_bits(i, m.n_layers) else None


def _always(target: str) -> LayerRule:
    return lambda i, m: target


def _first_eighth(target: str) -> LayerRule:
    return lambda i, m: target if i < m.n_layers // 8 else None


def _gqa4(target: str, otherwise: str | None = None) -> LayerRule:
    """Models with 4+ query heads per KV head have small attn_v matrices: llama.cpp spends bits there."""
    return lambda i, m: target if m.gqa >= 4 else otherwise


def _with_imatrix(rule: LayerRule) -> LayerRule:
    return lambda i, m: rule(i, m) if m.imatrix else None


def _without_imatrix(rule: LayerRule) -> LayerRule:
    return lambda i, m: None if m.imatrix else rule(i, m)


# IQ4_NL / IQ4_XS: attn_v in Q5_K for 4+ query heads per KV head; the first eighth of ffn_down in Q5_K
# unless an importance matrix guides the non-linear grid
IQ4_RULES: dict[str, LayerRule] = {"attn_v": _gqa4("Q5_K"), "ffn_down": _without_imatrix(_first_eighth("Q5_K"))}


@dataclass(frozen=True)
class FileType:
    name: str
    base: str  # type of every matrix no rule names
    ftype: int  # llama.cpp's LLAMA_FTYPE, written as general.file_type
    rules: dict[str, LayerRule] = field(default_factory=dict)  # tensor role (attn_v, ffn_down, ...) -> rule
    needs_imatrix: bool = False  # llama.cpp refuses to build it without an importance matrix

    @property
    def quantized(self) -> bool:
        return self.base not in FLOAT_TYPES


FILE_TYPES: dict[str, FileType] = {t.name: t for t in (
    FileType("F32", "F32", 0),
    FileType("F16", "F16", 1),
    FileType("BF16", "BF16", 32),
    FileType("Q8_0", "Q8_0", 7),
    FileType("Q6_K", "Q6_K", 18),
    FileType("Q5_1", "Q5_1", 9),
    FileType("Q5_0", "Q5_0", 8, {"ffn_down": _with_imatrix(_first_eighth("Q5_1"))}),
    FileType("Q4_1", "Q4_1", 3),
    FileType("Q4_0", "Q4_0", 2, {"ffn_down": _with_imatrix(_first_eighth("Q4_1"))}),
    FileType("Q5_K_M", "Q5_K", 17, {"attn_v": _more_bits_to("Q6_K"), "ffn_down": _more_bits_to("Q6_K")}),
    FileType("Q5_K_S", "Q5_K", 16),
    FileType("Q4_K_M", "Q4_K", 15, {"attn_v": _more_bits_to("Q6_K"), "ffn_down": _more_bits_to("Q6_K")}),
    FileType("Q4_K_S", "Q4_K", 14, {"attn_v": lambda i, m: "Q5_K" if i < 4 else None,
                                    "ffn_down": _first_eighth("Q5_K")}),
    FileType("Q3_K_L", "Q3_K", 13, {"attn_v": _always("Q5_K"), "ffn_down": _always("Q5_K"),
                                    "attn_output": _always("Q5_K")}),
    FileType("Q3_K_M", "Q3_K", 12, {"attn_v": lambda i, m: "Q5_K" if i < 2 else "Q4_K",
                                    "ffn_down": lambda i, m: "Q5_K" if i < m.n_layers // 16 else "Q4_K",
                                    "attn_output": _always("Q4_K")}),
    FileType("Q3_K_S", "Q3_K", 11),
    FileType("Q2_K", "Q2_K", 10, {"attn_v": _gqa4("Q4_K", "Q3_K"), "ffn_down": _always("Q3_K"),
                                  "attn_output": _always("Q3_K")}),
    FileType("Q2_K_S", "Q2_K", 21, {"attn_v": _gqa4("Q4_K"), "ffn_down": _first_eighth("Q4_K")},
             needs_imatrix=True),
    FileType("IQ4_NL", "IQ4_NL", 25, IQ4_RULES),
    FileType("IQ4_XS", "IQ4_XS", 30, IQ4_RULES),
)}


def resolve(name: str) -> FileType:
    name = ALIASES.get(name.upper(), name.upper())
    if name not in FILE_TYPES:
        raise QuantkitError(f"unknown GGUF type {name!r}; supported: {', '.join(supported_names())}")
    return FILE_TYPES[name]


def supported_names() -> list[str]:
    return list(FILE_TYPES) + [f"{alias} (= {target})" for alias, target in ALIASES.items()]


# llama.cpp's quantizer counts a fused q/k/v matrix (Phi-3's attn_qkv) as an attention-V tensor: it gets
# attn_v's rules, in attn_v's layer count (checked byte for byte against llama_model_quantize)
SAME_RULES_AS = {"attn_qkv": "attn_v", "ffn_down_exps": "ffn_down", "ffn_gate_exps": "ffn_gate",
                 "ffn_up_exps": "ffn_up"}

# llama.cpp's rules for models of exactly 8 experts (Mixtral-8x7B's size, where attention is a small part of
# the file): attn_v and attn_k in Q8_0 whatever the file type, attn_output in Q5_K for these file types (and
# the dense attn_output rules do not apply)
EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_NL", "IQ4_XS")


def role(gguf_name: str) -> str:
    """``attn_v`` for ``blk.3.attn_v.weight``; ``output`` for ``output.weight``; a role whose rules are another's
    (``SAME_RULES_AS``) answers as that one."""
    parts = gguf_name.split(".")
    found = parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]
    return SAME_RULES_AS.get(found, found)


def fallback_type(type_name: str, row_length: int) -> str | None:
    """The type llama.cpp falls back to when ``row_length`` does not fit ``type_name``; None if it fits."""
    if type_name in FLOAT_TYPES or row_length % block_size(type_name) == 0:
        return None
    fallback = GGUF_TYPES[type_name].fallback or type_name
    return fallback if row_length % block_size(fallback) == 0 else "F16"


# ---- overrides ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Override:
    """``PATTERN=TYPE``: tensors whose GGUF name the regex PATTERN finds a match in get TYPE."""

    spec: str
    pattern: re.Pattern
    type: str


def override_type(value: str, what: str) -> str:
    """A GGUF tensor type named by the user (case-insensitive), checked against what quantkit writes."""
    name = value.strip().upper()
    if name not in QUANT_TYPES + FLOAT_TYPES:
        raise QuantkitError(f"{what}: unknown tensor type {value!r}; use one of {', '.join(QUANT_TYPES + FLOAT_TYPES)}")
    return name


def parse_override(spec: str) -> Override:
    pattern, sep, type_name = spec.rpartition("=")
    if not sep or not pattern:
        raise QuantkitError(f"--tensor-type {spec!r} is not PATTERN=TYPE; write e.g. 'attn_v=Q8_0'")
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise QuantkitError(f"--tensor-type {spec!r}: {pattern!r} is not a valid regular expression ({exc})") from None
    return Override(spec, regex, override_type(type_name, f"--tensor-type {spec!r}"))


@dataclass(frozen=True)
class Choice:
    type: str
    by: str | None = None  # the option that decided it, if not the file type's rules
    fallback_from: str | None = None  # the type asked for, when the rows did not fit it


@dataclass
class TypeChooser:
    """Picks each matrix's type the way llama.cpp's quantizer does, options included."""

    file_type: FileType
    facts: ModelFacts
    pure: bool = False
    overrides: list[Override] = field(default_factory=list)
    token_embedding: str | None = None
    output: str | None = None
    # llama.cpp indexes a role's layers by how many tensors of that role reached its rules so far, so a
    # tensor typed by an override shifts the rules of the later layers; we count the same way (choose()
    # is called once per tensor, in layer order)
    _reached: dict[str, int] = field(default_factory=dict)

    def choose(self, gguf_name: str, layer: int | None, row_length: int) -> Choice:
        wanted, by = self._wanted(gguf_name, layer, row_length)
        fallback = fallback_type(wanted, row_length)
        return Choice(fallback or wanted, by, wanted if fallback else None)

    def _wanted(self, name: str, layer: int | None, row_length: int) -> tuple[str, str | None]:
        # llama.cpp's order: the two shortcuts, then the first matching pattern, then the file type's rules
        if self.token_embedding and name == "token_embd.weight":
            return self.token_embedding, "--token-embedding-type"
        if self.output and name == "output.weight":
            return self.output, "--output-tensor-type"
        for override in self.overrides:
            if override.pattern.search(name):
                return override.type, f"--tensor-type {override.spec}"
        if self.pure:
            return self.file_type.base, None
        return self._rule(name, layer, row_length), None

    def _rule(self, name: str, layer: int | None, row_length: int) -> str:
        base, facts = self.file_type.base, self.facts
        if name == "output.weight" or (facts.tied and name == "token_embd.weight"):
            if self.output:  # a tied embedding follows the output's type
                return self.output
            if row_length % block_size(base):
                return "Q8_0"
            return base if base == "Q8_0" else "Q6_K"
        tensor_role = role(name)
        index = self._reached.get(tensor_role, 0)
        self._reached[tensor_role] = index + 1
        if facts.n_expert == 8 and tensor_role == "attn_output":
            return "Q5_K" if self.file_type.name in EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K else base
        rule = self.file_type.rules.get(tensor_role)
        chosen = (rule(index, facts) if rule and layer is not None else None) or base
        if tensor_role == "attn_v" and facts.size_70b and chosen in ("Q3_K", "Q4_K"):
            chosen = "Q5_K"
        if facts.n_expert == 8 and tensor_role in ("attn_v", "attn_k"):
            chosen = "Q8_0"
        return chosen

    def needs_imatrix(self, name: str, type_name: str) -> bool:
        """llama.cpp only builds a Q2_K_S file's Q2_K block matrices from an importance matrix."""
        return (self.file_type.needs_imatrix and type_name == "Q2_K"
                and name not in ("token_embd.weight", "output.weight"))


def override_notes(decided: dict[str, list[str]]) -> list[str]:
    """One report line per option that decided tensor types; ``decided`` maps option -> tensor names."""
    notes = []
    for option, names in decided.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        notes.append(f"{option}: {len(names)} tensor{'s' if len(names) > 1 else ''} ({shown})")
    return notes


def check_overrides_used(chooser: TypeChooser, names: list[str], decided: dict[str, list[str]]) -> None:
    """Every pattern must decide at least one tensor: a typo must not pass silently."""
    for override in chooser.overrides:
        option = f"--tensor-type {override.spec}"
        if option in decided:
            continue
        if any(override.pattern.search(n) for n in names):
            raise QuantkitError(f"{option} decides no tensor: an earlier option takes every tensor it matches (the "
                                "first matching pattern wins, as in llama-quantize); put the narrower pattern first")
        raise QuantkitError(f"{option} matches no quantizable tensor (GGUF names look like {names[0]}, "
                            f"{names[1]}, {names[-1]}); fix the regular expression")
