"""Train a small Llama whose rows fit llama.cpp's 256-weight super-blocks, for benches that need a trained model
there: the K-quants, the IQ types and a size budget fall back to 32-blocks on TinyStories-656K (rows of 128 and 384).

Hidden 256, intermediate 768, 4 layers, 8 heads over 2 KV heads (head_dim 32), TinyStories-656K's tokenizer
(vocab 2048), tied embeddings, float32. Trained on the first 90 % of shared/data/tinystories-valid-head.txt in
windows of 256 tokens with a BOS in front; it prints its loss and the perplexity of the held-out 10 % and of
WikiText-2 at the end. Deterministic on one machine (seed, one thread count). Measured here (2 cores, shared):
500 steps in 17 min, held-out TinyStories PPL 109; 1000 steps in 18 min, train loss 1.8 but held-out PPL 135 (the
text is 174K tokens: longer runs memorize it).

    /work/main/.venv/bin/python bench/train_tinystories_256.py OUT_DIR [--steps 500]

The model is written with save_pretrained (safetensors) plus the tokenizer files; nothing here goes into the repo.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

DATA = Path(os.environ.get("QUANTFAB_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TOKENIZER = DATA / "tinystories-656k"
SEQ = 256


def token_windows(ids: np.ndarray, bos: int) -> torch.Tensor:
    """Non-overlapping windows of SEQ - 1 tokens, each after a BOS."""
    n = len(ids) // (SEQ - 1)
    body = torch.from_numpy(ids[:n * (SEQ - 1)].reshape(n, SEQ - 1).astype(np.int64))
    return torch.cat([torch.full((n, 1), bos, dtype=torch.int64), body], dim=1)


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, windows: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(input_ids=windows[i:i + 8], labels=windows[i:i + 8]).loss) for i in range(0, len(windows), 8)]
    model.train()
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    text = (DATA / "tinystories-valid-head.txt").read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    encode = lambda t: np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"], np.int64)  # noqa: E731
    train = token_windows(encode(text[:cut]), tokenizer.bos_token_id)
    held = token_windows(encode(text[cut:]), tokenizer.bos_token_id)
    wiki = token_windows(encode((DATA / "wikitext2-test.raw").read_text(encoding="utf-8")[:200_000]),
                         tokenizer.bos_token_id)[:64]
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    generator = torch.Generator().manual_seed(1)
    start = time.time()
    print(f"train {len(train)} windows, held out {len(held)}, wikitext {len(wiki)}; "
          f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    for step in range(args.steps):
        batch = train[torch.randint(len(train), (args.batch,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    print(f"held-out TinyStories PPL {perplexity(model, held):.2f}, WikiText-2 PPL {perplexity(model, wiki):.1f}")
    model.save_pretrained(args.out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (TOKENIZER / f).is_file():
            shutil.copyfile(TOKENIZER / f, args.out / f)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
