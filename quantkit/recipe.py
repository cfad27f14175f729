"""The resolved recipe of a run: what to quantize, how, and how to check it."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.grids import PER_CHANNEL, IntGrid
from quantkit.methods import METHODS
from quantkit.methods.options import parse_method_options
from quantkit.model import ModelSource

ACT_ORDERS = ("static", "group", "off")


@dataclass
class Recipe:
    method: str = "rtn"
    # KEY=VALUE options of the method's typed config (AWQConfig, GPTQConfig fields without a flag of their own)
    method_options: list[str] = field(default_factory=list)
    bits: int = 4
    group_size: int = 128  # -1 per channel, 0 per tensor
    scheme: str = "sym"  # sym = absmax, asym = zero-point
    damp_percent: float = 0.01  # GPTQ: Hessian damping, fraction of its mean diagonal
    # GPTQ column order: "static" sweeps columns by decreasing Hessian diagonal with each group's parameters
    # fitted up front, so groups stay in column order (llm-compressor's default; no g_idx); "group" lets groups
    # follow the sweep (desc_act, stored with g_idx); "off" sweeps columns in order
    act_order: str = "static"
    static_groups: bool = False  # GPTQ with act_order "off": fit group parameters before the sweep
    # GPTQ on GGUF grids: fit block scales weighting each column's error by the Hessian diagonal
    weighted_fit: bool = True
    runtime: str = "transformers"  # what loads hf-gptq / hf-awq for checking: transformers or quantkit
    device: str = "auto"  # where GPTQ/AWQ run their layer-by-layer pass: auto (cuda if present), cpu, cuda
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False
    exclude: list[str] = field(default_factory=list)  # glob patterns of tensor names kept unquantized
    # GGUF type choice, as llama-quantize's options: --pure drops llama.cpp's per-tensor rules; 'REGEX=TYPE'
    # overrides (first match on the GGUF name wins) and the two shortcuts come before the rules
    pure: bool = False
    tensor_types: list[str] = field(default_factory=list)
    token_embedding_type: str | None = None
    output_tensor_type: str | None = None
    calib: str = "builtin"
    calib_samples: int = 32
    # GGUF importance matrix: none, calib (collected from --calib text) or a llama.cpp imatrix file
    imatrix: str = "none"
    eval: str = "builtin"
    eval_samples: int = 16
    seq_len: int = 512
    max_ppl_increase_pct: float | None = None
    max_kld: float | None = None
    min_top1: float | None = None
    # gguf / hf-gptq mixed precision under a budget: per-matrix types chosen by predicted loss (quantkit.budget)
    target_bpw: float | None = None  # GGUF: over the file's tensors, as llama.cpp reports it; hf-gptq: over its linears
    max_size: str | None = None  # file (GGUF) or weight files (hf-gptq): bytes or with a unit (90MB, 1.5GiB)
    verify: bool = True  # False (--no-verify): export only; no reference, no runtime, no gate
    # accept artifacts whose runtime tokenizes differently from tokenizer.json (recorded in the manifest)
    allow_tokenizer_mismatch: bool = False

    def parsed_method_options(self) -> dict[str, object]:
        """``method_options`` typed and checked against the method's config."""
        method = METHODS[self.method]
        return parse_method_options(self.method, method.config_class, self.method_options, method.flagged)

    def validate(self) -> None:
        if isinstance(self.act_order, bool):  # the API's earlier spelling: True was g_idx-style act-order
            self.act_order = "group" if self.act_order else "off"
        if self.act_order not in ACT_ORDERS:
            raise QuantkitError(f"--act-order {self.act_order!r} is unknown; use one of {', '.join(ACT_ORDERS)}")
        if self.method not in METHODS:
            raise QuantkitError(f"unknown method {self.method!r}; choose one of: {', '.join(sorted(METHODS))}")
        if not 2 <= self.bits <= 8:
            raise QuantkitError(f"--bits {self.bits} is out of range; use 2 to 8")
        if self.scheme not in ("sym", "asym"):
            raise QuantkitError(f"--scheme {self.scheme!r} is unknown; use sym (absmax) or asym (zero-point)")
        if self.group_size < PER_CHANNEL:
            raise QuantkitError(f"--group-size {self.group_size} is invalid; use a positive size, -1 or 0")
        if not 0 < self.damp_percent < 1:
            raise QuantkitError(f"--damp-percent {self.damp_percent} is out of range; use a value in (0, 1)")
        if self.runtime not in ("transformers", "quantkit"):
            raise QuantkitError(f"--runtime {self.runtime!r} is unknown; use transformers or quantkit")
        if self.device not in ("auto", "cpu", "cuda"):
            raise QuantkitError(f"--device {self.device!r} is unknown; use auto, cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise QuantkitError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        if self.seq_len < 2 or self.calib_samples < 1 or self.eval_samples < 1:
            raise QuantkitError("--seq-len must be >= 2 and sample counts >= 1")
        self._validate_imatrix()
        self._validate_gguf_types()
        self._validate_budget()
        self.parsed_method_options()  # keys and types, for every method (rtn takes none)
        METHODS[self.method].from_recipe(self)  # the method's own config checks (values of --method-option)

    def _validate_gguf_types(self) -> None:
        """Malformed GGUF type options fail here even when no GGUF target would read them."""
        from quantkit.targets.gguf_mixes import override_type, parse_override  # targets import this module

        for spec in self.tensor_types:
            parse_override(spec)
        for option, value in (("--token-embedding-type", self.token_embedding_type),
                              ("--output-tensor-type", self.output_tensor_type)):
            if value is not None:
                override_type(value, option)

    def _validate_budget(self) -> None:
        from quantkit.budget import parse_size

        if self.target_bpw is not None and self.max_size is not None:
            raise QuantkitError("--target-bpw and --max-size both set a budget; give one")
        if self.target_bpw is not None and not 1.5 <= self.target_bpw <= 16:
            raise QuantkitError(f"--target-bpw {self.target_bpw} is out of range; use 1.5 to 16 bits per weight")
        if self.max_size is not None and parse_size(self.max_size) <= 0:
            raise QuantkitError(f"--max-size {self.max_size!r} must be a positive size")

    @property
    def budgeted(self) -> bool:
        return self.target_bpw is not None or self.max_size is not None

    def budget_label(self) -> str:
        """How a budgeted artifact's name says its budget: 4.20bpw or 90MB."""
        return f"{self.target_bpw:.2f}bpw" if self.target_bpw is not None else str(self.max_size).replace(" ", "")

    def _validate_imatrix(self) -> None:
        if self.imatrix == "none":
            return
        if self.method != "rtn":
            raise QuantkitError(f"--imatrix weighs round-to-nearest's error; --method {self.method} uses its own "
                                "calibration statistics, so drop --imatrix or use --method rtn")
        if self.imatrix != "calib" and not Path(self.imatrix).is_file():
            raise QuantkitError(f"--imatrix {self.imatrix!r} is neither none, calib nor an existing file; "
                                "pass a llama.cpp imatrix .gguf/.dat file or calib")

    @property
    def gptq_g_idx(self) -> bool:
        """Whether GPTQ's groups follow its column sweep (act-order "group"): checkpoints then need g_idx."""
        return self.method == "gptq" and self.act_order == "group"

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def int_grid(self) -> IntGrid:
        """The integer grid of checkpoint formats: fp16 scales, zero points that GPTQ v1 can store."""
        return IntGrid(bits=self.bits, group_size=self.group_size, symmetric=self.scheme == "sym",
                       fp16_scales=True, min_zero=1)

    def gate_overrides(self) -> dict[str, float | None]:
        return {"max_ppl_increase_pct": self.max_ppl_increase_pct, "max_kld": self.max_kld,
                "min_top1": self.min_top1}

    def to_dict(self) -> dict:
        return asdict(self)


def quantized_tensor_names(source: ModelSource, recipe: Recipe) -> list[str]:
    """Tensors the recipe quantizes: block linears by default, embeddings/lm_head on request."""
    names = [n for i in range(source.n_layers) for n in source.arch.linear_weights(i)]
    if recipe.quantize_embeddings:
        names.append(source.arch.embedding)
    if recipe.quantize_lm_head and not source.tied_embeddings:
        names.append(source.arch.lm_head)
    kept = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in recipe.exclude)]
    missing = [n for n in kept if n not in source.tensors]
    if missing:
        raise QuantkitError(f"{source.path} lacks {missing[0]} (and {len(missing) - 1} more); the checkpoint is "
                            "incomplete or its layout does not match its declared architecture")
    return kept


def check_grid_fits(source: ModelSource, names: list[str], grid, what: str) -> None:
    """Fail before any work if ``grid`` cannot hold one of the tensors."""
    for name in names:
        reason = grid.check_shape(name, source.tensors[name].shape)
        if reason:
            hint = "choose a group size that divides every row" if grid.group_size > 0 else "exclude it"
            raise QuantkitError(f"{what}: {reason}; {hint} (or --exclude '{name}')")

