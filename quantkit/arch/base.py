"""What a model family is, as data: its tensors, the order its block runs them, where scales fold, and how
llama.cpp names and describes it.

A family module (``quantkit/arch/<family>.py``) builds one ``Architecture`` and registers it; nothing in the
pipeline, the methods or the targets branches on the family. A target that cannot express something a
family needs (``Architecture.features``) refuses it by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from quantkit.arch.rope import gguf_rope_tensors, rope_of, write_gguf_scaling
from quantkit.errors import QuantkitError

# Linears of a Llama-style decoder block, in the order the block executes them.
LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

# HF block-relative tensor name -> GGUF block-relative tensor name (without ".weight"/".bias").
LLAMA_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# llama.cpp's size class of an 80-layer model, which its quantizer rules read (n_layer 80 = "70B")
LAYERS_70B = 80


@dataclass(frozen=True)
class FoldPoint:
    """A scale applied to the inputs of ``consumers`` can be folded into ``producer``'s output; AWQ scores a
    candidate scale on the output of ``inspect``, the smallest module that holds all the consumers."""

    producer: str
    consumers: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP as the checkpoint stores it: a router (kept in float) and, per expert, its own
    gate, up and down linears (``{module}.experts.{e}.{gate}``). The module that runs them in memory is
    quantkit's (``quantkit.arch.moe.SparseMoe``), so each expert's linears are ordinary modules that the
    methods calibrate on the tokens routed to them."""

    module: str  # block-relative MoE module, e.g. "block_sparse_moe"
    count_keys: tuple[str, ...]  # config keys of the number of experts (transformers 5 may save another name)
    router: str = "gate"  # relative to ``module``
    gate: str = "gate_proj"  # relative to ``module.experts.{e}``
    up: str = "up_proj"
    down: str = "down_proj"
    used_key: str = "num_experts_per_tok"
    width_key: str = "intermediate_size"  # config key of one expert's hidden width
    loaded_as: str = ""  # the block attribute transformers loads the MoE module as, when not ``module``
    normalize_key: str | None = None  # config flag: renormalise the chosen experts' weights (None: always)

    def __post_init__(self) -> None:
        if not self.loaded_as:
            object.__setattr__(self, "loaded_as", self.module)

    @property
    def experts_module(self) -> str:
        return f"{self.module}.experts"

    @property
    def router_name(self) -> str:
        return f"{self.module}.{self.router}"

    def count(self, config: dict) -> int:
        for key in self.count_keys:
            if config.get(key):
                return int(config[key])
        return int(hparam(config, self.count_keys[0]))

    def checkpoint_name(self, name: str) -> str:
        """A tensor's name in a quantized HF checkpoint (hf-gptq, hf-awq), as transformers 5 reads one after
        gptqmodel's defuser has split its fused experts: the MoE module under its loaded name, each expert's
        linears as gate_proj / up_proj / down_proj."""
        head, sep, tail = name.partition(f".{self.module}.")
        if not sep:
            return name
        parts = tail.split(".")
        if parts[0] == "experts" and len(parts) > 2:
            own = {self.gate: "gate_proj", self.up: "up_proj", self.down: "down_proj"}
            parts[2] = own.get(parts[2], parts[2])
        return ".".join([head, self.loaded_as, *parts])

    def linear(self, expert: int, part: str) -> str:
        """Block-relative name of one expert's gate / up / down linear."""
        return f"{self.experts_module}.{expert}.{getattr(self, part)}"


def hparam(config: dict, key: str, default=None):
    """A config.json value a target cannot do without."""
    value = config.get(key, default)
    if value is None:
        raise QuantkitError(f"config.json lacks {key!r}; exporting this model needs it")
    return value


@dataclass(frozen=True)
class Architecture:
    name: str
    hf_class: str
    gguf_arch: str
    linears: tuple[str, ...] = LLAMA_LINEARS
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    block_prefix: str = "model.layers.{index}."
    blocks_module: str = "model.layers"
    rotary_module: str = "model.rotary_emb"
    # Linears that read the same input, in execution order (sequential methods quantize group by group).
    linear_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    embedding: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    gguf_block_names: dict[str, str] = field(default_factory=lambda: dict(LLAMA_GGUF_NAMES))
    # llama.cpp's "llama" graph applies rope to interleaved pairs: q/k rows are permuted on export.
    rope_permute: bool = True
    # Linears that carry a bias tensor (Qwen2's q/k/v).
    biased_linears: tuple[str, ...] = ()
    # Per-head RMSNorms applied to the queries and keys before rope (Qwen3): block-relative module names.
    qk_norms: tuple[str, ...] = ()
    # q/k/v and gate/up are each one fused linear (Phi-3): ``linears`` lists them as such
    fused: bool = False
    # RMSNorms that scale by (offset + weight) (Gemma: 1): GGUF stores offset + weight, AWQ folds through it
    norm_offset: float = 0.0
    # the MLP's activation as the graph targets name it (silu: SwiGLU; gelu_tanh: GeGLU)
    activation: str = "silu"
    fold_points: tuple[FoldPoint, ...] = (
        FoldPoint("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        FoldPoint("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        FoldPoint("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        FoldPoint("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    )
    # llama.cpp calls an 80-layer model "70B" (which its quantizer rules read) only with grouped KV heads for
    # some families (llama: 80 layers and n_kv == n_head is its 65B), for others at any head count (qwen2).
    size_70b_needs_gqa: bool = True
    # a mixture-of-experts MLP in place of the dense one (``linears`` then lists attention's only until
    # ``bind`` adds each expert's, whose count the config gives)
    experts: Experts | None = None
    # block-relative GGUF tensor -> the HF tensors stacked into it, one per expert (filled by ``bind``)
    gguf_stacks: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # per-expert parts of the MoE MLP, GGUF names of the stacks (llama.cpp's)
    expert_gguf_names: tuple[tuple[str, str], ...] = (("gate", "ffn_gate_exps"), ("up", "ffn_up_exps"),
                                                      ("down", "ffn_down_exps"))

    def bind(self, config: dict) -> Architecture:
        """This family for one checkpoint: a mixture-of-experts family gets each expert's linears (in execution
        order), their fold points and their GGUF stacks; a dense one is returned as it is."""
        x = self.experts
        if x is None or self.gguf_stacks:
            return self
        count = x.count(config)
        parts = [(x.linear(e, "gate"), x.linear(e, "up"), x.linear(e, "down")) for e in range(count)]
        router_input = next(f.producer for f in self.fold_points if x.router_name in f.consumers)
        folds = tuple(f for f in self.fold_points if f.producer != router_input) + (
            FoldPoint(router_input, (x.router_name, *(n for g, u, _ in parts for n in (g, u))), x.module),
            *(FoldPoint(u, (d,), d) for _, u, d in parts))
        return replace(
            self,
            linears=self.linears + tuple(n for p in parts for n in p),
            linear_groups=self.linear_groups + tuple(g for gate, up, down in parts for g in ((gate, up), (down,))),
            fold_points=folds,
            gguf_block_names={**self.gguf_block_names, x.router_name: "ffn_gate_inp"},
            gguf_stacks=tuple((gguf, tuple(x.linear(e, part) for e in range(count)))
                              for part, gguf in self.expert_gguf_names),
        )

    def checkpoint_name(self, name: str) -> str:
        """A full tensor name as quantized HF checkpoints of this family name it."""
        return self.experts.checkpoint_name(name) if self.experts else name

    def expert_of(self, name: str) -> int | None:
        """The expert a block-relative linear belongs to, None outside the experts."""
        if self.experts is None or not name.startswith(self.experts.experts_module + "."):
            return None
        return int(name[len(self.experts.experts_module) + 1:].split(".", 1)[0])

    @property
    def float_tensors(self) -> tuple[str, ...]:
        """Block-relative matrices that stay in float in every artifact (a router, as llama.cpp keeps it)."""
        return (self.experts.router_name,) if self.experts else ()

    def block(self, index: int) -> str:
        return self.block_prefix.format(index=index)

    def linear_weights(self, index: int) -> list[str]:
        """Full tensor names of the block's linear weights, in execution order."""
        return [f"{self.block(index)}{name}.weight" for name in self.linears]

    @property
    def features(self) -> frozenset[str]:
        """What a graph of this family needs beyond a Llama block: targets that build their own graph check it."""
        found = set()
        if self.biased_linears:
            found.add("linear biases")
        if self.qk_norms:
            found.add("q/k norms")
        if self.fused:
            found.add("fused qkv and gate_up linears")
        if self.norm_offset:
            found.add("offset norms")
        if self.activation != "silu":
            found.add(f"{self.activation} activation")
        if self.experts:
            found.add("mixture of experts")
        return frozenset(found)

    # ---- GGUF -----------------------------------------------------------------------------------
    def gguf_names(self, n_layers: int) -> dict[str, str]:
        """HF tensor name -> GGUF tensor name for every tensor of a GGUF file of this family."""
        names = {self.embedding: "token_embd.weight", self.final_norm: "output_norm.weight",
                 self.lm_head: "output.weight"}
        for i in range(n_layers):
            for hf_rel, gguf_rel in self.gguf_block_names.items():
                names[f"{self.block(i)}{hf_rel}.weight"] = f"blk.{i}.{gguf_rel}.weight"
                if hf_rel in self.biased_linears:
                    names[f"{self.block(i)}{hf_rel}.bias"] = f"blk.{i}.{gguf_rel}.bias"
        return names

    def gguf_block_tensors(self) -> list[tuple[str, tuple[str, ...]]]:
        """Each block-relative GGUF tensor with the HF tensors it holds: one, or one per expert stacked."""
        return [(gguf, (hf,)) for hf, gguf in self.gguf_block_names.items()] + list(self.gguf_stacks)

    def norm_weights(self, n_layers: int) -> set[str]:
        """Every RMSNorm weight of the model (the final norm, each block's, q/k norms)."""
        names = {self.final_norm}
        for i in range(n_layers):
            names.update(f"{self.block(i)}{n}.weight" for n in (*self.norms, *self.qk_norms))
        return names

    def rope_heads(self, hf_rel: str, config: dict) -> int | None:
        """Heads of a q/k projection whose rows llama.cpp's graph wants in its interleaved rope layout."""
        if not self.rope_permute:
            return None
        n_head = hparam(config, "num_attention_heads")
        if hf_rel == self.linears[0]:
            return n_head
        if hf_rel == self.linears[1]:
            return config.get("num_key_value_heads") or n_head
        return None

    def is_70b(self, n_layers: int, config: dict) -> bool:
        n_head = hparam(config, "num_attention_heads")
        n_kv = config.get("num_key_value_heads") or n_head
        return n_layers == LAYERS_70B and (n_kv != n_head or not self.size_70b_needs_gqa)

    def write_gguf_hparams(self, w, config: dict, n_layers: int) -> None:
        """The family's hyperparameters under llama.cpp's keys (``w`` is a ``gguf.GGUFWriter`` for
        ``gguf_arch``, which prefixes them with the architecture name)."""
        head_dim = self.write_gguf_shape(w, config, n_layers)
        rope = rope_of(config)
        w.add_rope_dimension_count(rope.rotary_dims(head_dim))
        w.add_rope_freq_base(rope.theta)
        write_gguf_scaling(w, rope)
        w.add_vocab_size(hparam(config, "vocab_size"))
        self.write_gguf_experts(w, config)

    def gguf_extra_tensors(self, config: dict) -> list[tuple[str, list[float]]]:
        """F32 tensors a GGUF file of this family carries beyond the checkpoint's (rope scaling factors), named
        and computed as llama.cpp's converter writes them."""
        return gguf_rope_tensors(rope_of(config), self.head_dim(config))

    @staticmethod
    def head_dim(config: dict) -> int:
        return config.get("head_dim") or hparam(config, "hidden_size") // hparam(config, "num_attention_heads")

    def write_gguf_experts(self, w, config: dict) -> None:
        if self.experts is None:
            return
        w.add_expert_count(self.experts.count(config))
        w.add_expert_used_count(int(hparam(config, self.experts.used_key)))
        if self.experts.width_key != "intermediate_size":
            w.add_expert_feed_forward_length(int(hparam(config, self.experts.width_key)))

    def write_gguf_shape(self, w, config: dict, n_layers: int) -> int:
        """Sizes every family writes alike: context, widths, layers, heads, RMSNorm epsilon; returns head_dim."""
        n_head = hparam(config, "num_attention_heads")
        hidden = hparam(config, "hidden_size")
        head_dim = self.head_dim(config)
        w.add_context_length(hparam(config, "max_position_embeddings"))
        w.add_embedding_length(hidden)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(hparam(config, "intermediate_size"))
        w.add_head_count(n_head)
        w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_layer_norm_rms_eps(float(hparam(config, "rms_norm_eps")))
        return head_dim

    def check_gguf(self, config: dict) -> None:
        """Fail before any work when config.json lacks what the GGUF file needs."""
        self.gguf_extra_tensors(config)  # a rope variant llama.cpp cannot express, or factors that do not fit
        for key in ("num_attention_heads", "hidden_size", "max_position_embeddings", "intermediate_size",
                    "rms_norm_eps", "vocab_size"):
            hparam(config, key)
