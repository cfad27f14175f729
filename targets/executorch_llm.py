"""The decoder ExecuTorch's LLM runner drives: ``forward(tokens, input_pos) -> logits`` with a static KV cache.

``tokens`` is ``(1, T)`` for any T up to the cache length (a whole prompt in one call, then one token per
call), ``input_pos`` the position of its first token; each layer writes its keys and values into cache
buffers at those positions (buffers the program mutates, so the cache lives in the runtime between calls)
and attends over the cache with a mask that hides positions after each query's own. Built from the
checkpoint through the family's data (``Architecture``): the same Llama-shaped block the onnx graph
expresses (biases on q/k/v, q/k norms), with quantkit's quantized linears where the recipe quantizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quantkit.arch.base import hparam
from quantkit.model import ModelSource

# What this decoder expresses beyond a Llama block (Architecture.features); other families keep the
# full-sequence program
FEATURES = frozenset({"linear biases", "q/k norms"})


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CachedAttention(nn.Module):
    def __init__(self, linears: dict[str, nn.Module], norms: dict[str, torch.Tensor], shape: dict, max_len: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (linears[n] for n in ("q", "k", "v", "o"))
        self.heads, self.kv_heads, self.head_dim, self.eps = (shape[k] for k in ("heads", "kv_heads", "head_dim",
                                                                                   "eps"))
        self.q_norm = None if "q" not in norms else nn.Parameter(norms["q"], requires_grad=False)
        self.k_norm = None if "k" not in norms else nn.Parameter(norms["k"], requires_grad=False)
        cache = (1, self.kv_heads, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        q = self.q(x).view(1, length, self.heads, self.head_dim)
        k = self.k(x).view(1, length, self.kv_heads, self.head_dim)
        v = self.v(x).view(1, length, self.kv_heads, self.head_dim)
        if self.q_norm is not None:  # per-head RMSNorm before rope (Qwen3)
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        self.k_cache.index_copy_(2, positions, k)
        self.v_cache.index_copy_(2, positions, v)
        # grouped heads without copying the cache: the queries of KV head j (heads j*r .. j*r + r - 1) become
        # r x T rows against that head's keys (a batched matmul per KV head)
        repeat = self.heads // self.kv_heads
        q = q.reshape(1, self.kv_heads, repeat * length, self.head_dim)
        scores = torch.matmul(q, self.k_cache.transpose(2, 3)) * self.head_dim ** -0.5
        scores = scores.masked_fill(~mask.repeat(repeat, 1), float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), self.v_cache)
        out = out.reshape(1, self.heads, length, self.head_dim)
        return self.o(out.transpose(1, 2).reshape(1, length, self.heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, attention: CachedAttention, mlp: dict[str, nn.Module], norms: tuple[torch.Tensor, ...],
                 eps: float):
        super().__init__()
        self.attention, self.eps = attention, eps
        self.gate, self.up, self.down = mlp["gate"], mlp["up"], mlp["down"]
        self.norm_in = nn.Parameter(norms[0], requires_grad=False)
        self.norm_mlp = nn.Parameter(norms[1], requires_grad=False)

    def forward(self, x, cos, sin, positions, mask):
        x = x + self.attention(rms_norm(x, self.norm_in, self.eps), cos, sin, positions, mask)
        h = rms_norm(x, self.norm_mlp, self.eps)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class CachedDecoder(nn.Module):
    """``forward(tokens (1, T) int64, input_pos (1,) int64) -> logits (1, T, vocab)``."""

    def __init__(self, embedding: nn.Module, blocks: list[Block], final_norm: torch.Tensor, lm_head: nn.Module,
                 inv_freq: torch.Tensor, attention_scaling: float, max_len: int, eps: float):
        super().__init__()
        self.embedding, self.blocks, self.lm_head, self.eps = embedding, nn.ModuleList(blocks), lm_head, eps
        self.final_norm = nn.Parameter(final_norm, requires_grad=False)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling, self.max_len = attention_scaling, max_len

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        positions = input_pos + torch.arange(length, dtype=torch.long)
        angles = positions[:, None].float() * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        # query i sees cache slots 0..positions[i]; later slots hold zeros or another sequence's past
        mask = torch.arange(self.max_len, dtype=torch.long)[None, :] <= positions[:, None]
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, positions, mask)
        return self.lm_head(rms_norm(x, self.final_norm, self.eps))


def build_decoder(source: ModelSource, linear: Callable[[str], nn.Module], load: Callable[[str], torch.Tensor],
                  embedding: nn.Module, lm_head: nn.Module, rotary: tuple, max_len: int) -> CachedDecoder:
    """The checkpoint as a ``CachedDecoder``: ``linear(name)`` gives each block linear's module (quantized or
    not), ``load(name)`` float tensors as the method left them (AWQ rescales norms)."""
    arch, cfg = source.arch, source.config
    heads = hparam(cfg, "num_attention_heads")
    shape = {"heads": heads, "kv_heads": cfg.get("num_key_value_heads") or heads,
             "head_dim": cfg.get("head_dim") or hparam(cfg, "hidden_size") // heads,
             "eps": float(cfg.get("rms_norm_eps", 1e-6))}
    blocks = []
    for i in range(source.n_layers):
        prefix = arch.block(i)
        modules = {role: linear(f"{prefix}{name}.weight")
                   for role, name in zip(("q", "k", "v", "o", "gate", "up", "down"), arch.linears, strict=True)}
        qk = {role: load(f"{prefix}{name}.weight").float() for role, name in zip(("q", "k"), arch.qk_norms,
                                                                                  strict=False)}
        attention = CachedAttention(modules, qk, shape, max_len)
        norms = tuple(load(f"{prefix}{n}.weight").float() for n in arch.norms)
        blocks.append(Block(attention, modules, norms, shape["eps"]))
    inv_freq, scaling = rotary
    return CachedDecoder(embedding, blocks, load(arch.final_norm).float(), lm_head, torch.as_tensor(inv_freq),
                         scaling, max_len, shape["eps"]).eval()
