"""Train quantkit's embedded default model from the Python standard library.

    python scripts/train_default_model.py --out quantkit/assets/default_model

Trains a byte-level BPE tokenizer (GPT-2 pre-tokenization, 4096 tokens) and a small
LlamaForCausalLM (hidden 256, 4 layers, 4 heads / 2 KV heads, intermediate 768, context 512)
on the "train" split of the standard library corpus (see quantkit.data). Seeded: the same
interpreter, torch version and arguments reproduce the checkpoint. Writes an ordinary Hugging Face
folder (config.json, model.safetensors in bf16, tokenizer files) plus training_report.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quantkit import data

EOS = "<|endoftext|>"


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None)


def model_config(vocab_size: int, eos_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, ids: torch.Tensor) -> float:
    model.eval()
    total, count = 0.0, 0
    for row in ids.split(4):
        out = model(input_ids=row, labels=row)
        n = row.shape[0] * (row.shape[1] - 1)
        total += out.loss.item() * n
        count += n
    model.train()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()

    train_docs = data.builtin_documents("train")
    random.Random(args.seed).shuffle(train_docs)
    tokenizer = train_tokenizer(train_docs, 4096)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    stream = torch.tensor(data.tokenize_documents(tokenizer, train_docs, eos_id), dtype=torch.int64)
    eval_ids = data.make_samples(tokenizer, data.BUILTIN, "eval", 16, args.seq_len).ids
    print(f"train stream: {stream.numel()} tokens; tokenizer took {time.time() - started:.0f}s", flush=True)

    model = LlamaForCausalLM(model_config(len(tokenizer), eos_id))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 20)
    train_start = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, stream.numel() - args.seq_len, (args.batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + args.seq_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch_size * args.seq_len / (time.time() - train_start)
            print(f"step {step:5d} loss {loss.item():.3f} lr {opt.param_groups[0]['lr']:.2e} {rate:.0f} tok/s",
                  flush=True)

    model = model.to(torch.bfloat16)
    # Evaluate the weights exactly as shipped (bf16), computing in fp32.
    eval_ppl = evaluate(model.float(), eval_ids)
    model = model.to(torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    report = {
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "train_stream_tokens": int(stream.numel()),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "seed": args.seed,
        "wall_seconds": round(time.time() - started, 1),
        "eval_perplexity": round(eval_ppl, 3),
        "eval_tokens": int(eval_ids.numel()),
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
