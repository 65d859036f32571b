"""Fixed evaluation protocol shared by both sides of the llm-compressor benchmark.

Importable from any virtual environment: it depends only on numpy, torch and transformers (and the
tokenizer that ships with the model). Nothing here knows about quantfab or llm-compressor.

Text
    The whole file (``tinystories-valid-head.txt``, read as UTF-8, not stripped) is tokenized once
    with the model's own tokenizer and ``add_special_tokens=False``. With the TinyStories-656K
    tokenizer that gives 193,012 text tokens (sha256 of the int64 ids, first 16 hex: d88220a926a9a6d5).

Evaluation tokens (``eval_chunks``)
    The first ``EVAL_TOKENS`` = 40,000 text tokens, cut into consecutive chunks of ``EVAL_CHUNK`` =
    256 tokens (156 full chunks, then one of 64). Each chunk is run as ``[BOS] + chunk`` (BOS id 1),
    and the logits at positions 0..n-1 predict the chunk's n tokens, so every one of the 40,000 text
    tokens is a scored prediction (the first token of each chunk is predicted from BOS alone).
    FP32 perplexity of TinyStories-656K under this protocol: 30.968368.

Calibration rows (``calibration_rows``)
    ``CALIB_ROWS`` = 64 rows of ``CALIB_LEN`` = 257 token ids, int64, shape (64, 257). Each row is
    BOS followed by ``CALIB_TEXT`` = 256 text tokens. The text tokens are the LAST 64 * 256 = 16,384
    text tokens of the file, cut into 64 consecutive, non-overlapping pieces of 256, in file order
    (row 0 holds the earliest of them). They do not overlap the evaluation tokens (the first 40,000).
    Both sides feed exactly this array, with an all-ones attention mask, to their calibration.
    Why 256 text tokens and not BOS + 255 (rows of 256): both readings were run through
    llm-compressor 0.14's GPTQ W4 g32 asym; BOS + 256 reproduces the lead's earlier figure
    (PPL 31.851, KL 0.0316) exactly (31.8506 / 0.03157), BOS + 255 does not (31.935 / 0.0310).
    RTN does not use the rows and is identical either way. The other reading stays available as
    ``calibration_rows(..., text_per_row=255)``, for comparison only.

Metrics (``evaluate``)
    * ``ppl``: exp(mean negative log-likelihood) over the 40,000 scored tokens.
    * ``kl``: mean over scored tokens of KL(p_fp32 || p_quant) = sum_v p32 (log p32 - log pq), in nats.
    * ``top1``: fraction of scored positions where argmax of the quantized logits equals argmax
      of the fp32 logits.
    Logits come out of the model in float32; log-softmax is taken in float64.
    The fp32 reference (``fp32_logprobs``) is computed once and reused for every quantized model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BOS_ID = 1
EVAL_TOKENS = 40_000
EVAL_CHUNK = 256
CALIB_ROWS = 64
CALIB_TEXT = 256  # text tokens per calibration row, after the BOS
CALIB_LEN = CALIB_TEXT + 1  # row length including the BOS (257)
BATCH = 32  # chunks per forward pass (numerics are per-row; batching only saves time)

__all__ = [
    "BOS_ID", "EVAL_TOKENS", "EVAL_CHUNK", "CALIB_ROWS", "CALIB_TEXT", "CALIB_LEN",
    "text_tokens", "eval_chunks", "calibration_rows", "fp32_logprobs", "evaluate", "Reference",
    "tokens_digest",
]

_TOKEN_CACHE: dict[tuple[str, str], np.ndarray] = {}


def text_tokens(tokenizer, path) -> np.ndarray:
    """All token ids of the file at ``path`` (``add_special_tokens=False``), int64, cached per process."""
    path = str(Path(path).resolve())
    key = (path, getattr(tokenizer, "name_or_path", "") + str(len(tokenizer)))
    if key not in _TOKEN_CACHE:
        text = Path(path).read_text(encoding="utf-8")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        _TOKEN_CACHE[key] = np.asarray(ids, dtype=np.int64)
    return _TOKEN_CACHE[key]


def eval_chunks(tokenizer, path, tokens: int = EVAL_TOKENS, chunk: int = EVAL_CHUNK) -> list[np.ndarray]:
    """The first ``tokens`` text tokens in chunks of ``chunk`` (last one shorter), WITHOUT the BOS.

    ``evaluate`` prepends BOS to each chunk itself.
    """
    ids = text_tokens(tokenizer, path)
    if len(ids) < tokens:
        raise ValueError(f"{path} has only {len(ids)} tokens, need {tokens}")
    ids = ids[:tokens]
    return [ids[i:i + chunk].copy() for i in range(0, tokens, chunk)]


def calibration_rows(tokenizer, path, rows: int = CALIB_ROWS, text_per_row: int = CALIB_TEXT) -> np.ndarray:
    """(rows, 1 + text_per_row) int64: BOS + text tokens, from the last rows*text_per_row text tokens.

    Protocol default: (64, 257) = BOS + 256 text tokens per row.
    """
    ids = text_tokens(tokenizer, path)
    need = rows * text_per_row
    if len(ids) < need + EVAL_TOKENS:
        raise ValueError(f"{path} is too short for {rows}x{text_per_row} calibration tokens")
    tail = ids[len(ids) - need:].reshape(rows, text_per_row)
    out = np.empty((rows, 1 + text_per_row), dtype=np.int64)
    out[:, 0] = BOS_ID
    out[:, 1:] = tail
    return out


def tokens_digest(arr) -> str:
    """sha256 (first 16 hex) of int64 token ids, to check that two venvs tokenize identically."""
    if isinstance(arr, list):
        arr = np.concatenate(arr)
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.int64).tobytes()).hexdigest()[:16]


@torch.no_grad()
def _logits(model, chunks: list[np.ndarray]) -> list[torch.Tensor]:
    """float32 logits, one (n, vocab) tensor per chunk: row j predicts chunk[j]."""
    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(chunks)
    # group equal-length chunks into batches
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        by_len.setdefault(len(c), []).append(i)
    for n, idx in by_len.items():
        for b in range(0, len(idx), BATCH):
            sel = idx[b:b + BATCH]
            x = np.empty((len(sel), n + 1), dtype=np.int64)
            x[:, 0] = BOS_ID
            for r, i in enumerate(sel):
                x[r, 1:] = chunks[i]
            inp = torch.from_numpy(x).to(device)
            logits = model(input_ids=inp, attention_mask=torch.ones_like(inp), use_cache=False).logits
            logits = logits[:, :n, :].float().cpu()
            for r, i in enumerate(sel):
                out[i] = logits[r].clone()
    return out  # type: ignore[return-value]


@dataclass
class Reference:
    """fp32 reference: float32 logits per chunk (log-softmax in float64 is taken on use)."""
    logits: list[torch.Tensor]
    ppl: float
    tokens: int


def fp32_logprobs(model, chunks: list[np.ndarray]) -> Reference:
    """Run the fp32 model once over the eval chunks; pass the result to ``evaluate(..., reference=)``."""
    logits = _logits(model, chunks)
    nll, n = 0.0, 0
    for lg, c in zip(logits, chunks):
        lp = torch.log_softmax(lg.double(), dim=-1)
        tgt = torch.from_numpy(c)
        nll -= lp.gather(1, tgt[:, None]).sum().item()
        n += len(c)
    return Reference(logits=logits, ppl=math.exp(nll / n), tokens=n)


def evaluate(model, eval_chunks: list[np.ndarray], reference: Reference | None = None) -> dict:
    """{ppl, kl, top1, tokens}; kl/top1 only when an fp32 ``reference`` (from fp32_logprobs) is given."""
    logits = _logits(model, eval_chunks)
    nll, kl, agree, n = 0.0, 0.0, 0, 0
    for i, (lg, c) in enumerate(zip(logits, eval_chunks)):
        lq = torch.log_softmax(lg.double(), dim=-1)
        tgt = torch.from_numpy(c)
        nll -= lq.gather(1, tgt[:, None]).sum().item()
        n += len(c)
        if reference is not None:
            ref = reference.logits[i]
            lp = torch.log_softmax(ref.double(), dim=-1)
            kl += (lp.exp() * (lp - lq)).sum().item()
            agree += int((ref.argmax(-1) == lg.argmax(-1)).sum().item())
    res = {"ppl": math.exp(nll / n), "tokens": n}
    if reference is not None:
        res["kl"] = kl / n
        res["top1"] = agree / n
    return res
