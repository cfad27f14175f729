"""Random-weight Llama checkpoints of real shapes, for speed and memory measurements (never committed).

    python benchmarks/make_checkpoint.py OUT --shape llama-3-8b [--layers 4]

Shapes: llama-3.2-1b (hidden 2048, 16 layers, MLP 8192, 32/8 heads, vocab 128256, tied embeddings) and
llama-3-8b (hidden 4096, 32 layers, MLP 14336, 32/8 heads, vocab 128256). ``--layers N`` keeps the first N
blocks (a slice with the full embedding and output). Weights are bf16, N(0, 0.02) (norms near 1), written
one tensor at a time into safetensors shards of at most 2 GiB, so making the 8B (16 GiB) needs little
memory. The tokenizer is the embedded model's (GGUF export pads the vocabulary to the embedding's rows);
random weights say nothing about accuracy: these checkpoints are for time and memory only.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.model import default_model_dir

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
SHARD_BYTES = 2 << 30


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                       p + "mlp.down_proj.weight": (h, m)})
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def random_tensor(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return (1.0 + 0.05 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--layers", type=int, default=None, help="keep the first N decoder blocks")
    args = ap.parse_args()

    cfg = dict(SHAPES[args.shape], architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
               rope_theta=500000.0, max_position_embeddings=8192, hidden_act="silu", bos_token_id=0,
               eos_token_id=0, torch_dtype="bfloat16")
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    args.out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    weight_map = {}
    files = []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], args.out / name, metadata={"format": "pt"})
        files.append(name)
        for key in shards[-1]:
            weight_map[key] = name
        shards[-1].clear()
        sizes[-1] = 0

    for name, shape in tensor_shapes(cfg).items():
        tensor = random_tensor(shape, generator)
        if sizes[-1] and sizes[-1] + tensor.nbytes > SHARD_BYTES:
            flush()
        shards[-1][name] = tensor
        sizes[-1] += tensor.nbytes
    flush()
    (args.out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir() / name, args.out / name)
    params = sum(torch.Size(s).numel() for s in tensor_shapes(cfg).values())
    print(f"wrote {args.out}: {params / 1e9:.2f}B parameters in {len(files)} shards")


if __name__ == "__main__":
    main()
