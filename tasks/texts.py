"""Token streams for calibration and evaluation: text files (.txt, .jsonl) or synthetic token ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from quantfab.tasks import synthetic
from quantfab.tasks.errors import UserError
from quantfab.tasks.redact import redact
from quantfab.tasks.store import filesystem

CHARS_PER_TOKEN_GUESS = 8  # generous: read this many characters per token needed, then stop
BINARY_MAGIC = {b"\x80\x02": "a pickle", b"\x80\x03": "a pickle", b"\x80\x04": "a pickle", b"\x80\x05": "a pickle",
                b"PK\x03\x04": "a zip archive (torch.save writes these)", b"\x93NUMPY": "a NumPy array"}


def read_tokens(url: str, tokenizer, vocab_size: int, needed: int, text_field: str = "text",
                expected_sha256: str | None = None) -> np.ndarray:
    """At least ``needed`` token ids from the source if it has them (fewer only when the text runs out). With
    ``expected_sha256`` (the stage's key, from ``text_digest``), a text whose bytes read differ is refused."""
    if url.startswith("synthetic://"):
        return synthetic.token_stream(url, vocab_size, needed)
    raw = _text_prefix(url, needed)
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise UserError(f"{redact(url)}: the text changed after this build's cache keys were computed (sha256 of the bytes "
                        f"read {expected_sha256[:12]}…, now {hashlib.sha256(raw).hexdigest()[:12]}…): "
                        "run the build again")
    text = raw.decode("utf-8", errors="ignore").replace("\r\n", "\n")
    if url.endswith(".jsonl"):
        text = _jsonl_text(url, text, text_field, complete=len(raw) < _prefix_bytes(needed))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def text_digest(url: str, needed: int) -> str | None:
    """sha256 of the bytes ``read_tokens`` reads for ``needed`` tokens (None for synthetic ids, which the URL
    fixes). calibrate and validate key on it, so editing a text they read reruns them; the rest of a long file,
    which they never read, does not."""
    if url.startswith("synthetic://"):
        return None
    return hashlib.sha256(_text_prefix(url, needed)).hexdigest()


def _text_prefix(url: str, needed: int) -> bytes:
    """What a text source gives for ``needed`` tokens: its first bytes at a generous guess per token."""
    return read_text_bytes(url, "text file", _prefix_bytes(needed))


def _prefix_bytes(needed: int) -> int:
    return needed * CHARS_PER_TOKEN_GUESS


def bos_of(config) -> int:
    """The token every calibration and evaluation window starts with (1 where the config names none)."""
    return int(config.bos_token_id if config.bos_token_id is not None else 1)


def calibration_tokens_read(samples: int, seq_len: int) -> int:
    """Text tokens calibrate reads: four times its windows' worth, so the seed has windows to choose from."""
    return samples * (seq_len - 1) * 4


def evaluation_window_count(tokens: int, window: int) -> int:
    """Windows validate scores: ``tokens`` cut into windows of ``window`` (BOS first), at least one."""
    return max(tokens // window, 1)


def evaluation_tokens_read(tokens: int, window: int) -> int:
    """Text tokens validate reads: each window's after its BOS."""
    return evaluation_window_count(tokens, window) * (window - 1)


def read_text_bytes(url: str, what: str, limit: int | None = None) -> bytes:
    """The first ``limit`` bytes of a text source (all of it when None), refused if binary; errors name it as
    ``what`` (e.g. "text file", "task file")."""
    fs, path = filesystem(url, what)
    try:
        with fs.open(path, "rb") as f:
            raw = f.read() if limit is None else f.read(limit)
    except FileNotFoundError:
        raise UserError(f"{redact(url)}: no such {what}") from None
    except OSError as exc:
        raise UserError(f"{redact(url)}: cannot read the {what}: {exc}") from None
    _refuse_binary(redact(url), raw)
    return raw


def _refuse_binary(url: str, raw: bytes) -> None:
    """Text sources are read as text, never deserialised; a pickled or array dataset is named, not decoded."""
    for magic, what in BINARY_MAGIC.items():
        if raw.startswith(magic):
            raise UserError(f"{url}: is {what}, not text; calibration and evaluation read .txt or .jsonl text only "
                            "(pickled datasets are never loaded)")


def _jsonl_text(url: str, text: str, field: str, complete: bool) -> str:
    lines = text.split("\n")
    if not complete:
        lines = lines[:-1]  # the last line may be cut mid-record
    parts = []
    for n, record in jsonl_records(url, lines):
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise UserError(f"{url}:{n}: expected an object with a string field {field!r}")
        parts.append(record[field])
    return "\n\n".join(parts)


def jsonl_records(url: str, lines: list[str]) -> Iterator[tuple[int, Any]]:
    """Each non-blank line's 1-based number and parsed JSON; a line that is not JSON is named by file and line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{url}:{n}: not valid JSON ({exc.msg})") from None


def windows(ids: np.ndarray, length: int, count: int, bos: int, url: str, what: str) -> np.ndarray:
    """``count`` non-overlapping windows of ``length`` tokens, each BOS then ``length - 1`` text tokens."""
    body = length - 1
    available = len(ids) // body
    if available < count:
        raise UserError(f"{url}: {what} needs {count} windows of {length} tokens ({count * body} text tokens) "
                        f"but the text gives {len(ids)} tokens ({available} windows)")
    out = np.empty((count, length), dtype=np.int64)
    out[:, 0] = bos
    out[:, 1:] = ids[: count * body].reshape(count, body)
    return out


def sampled_windows(ids: np.ndarray, length: int, count: int, bos: int, seed: int, url: str) -> np.ndarray:
    """Calibration windows: ``count`` of the non-overlapping windows, chosen by ``seed``."""
    body = length - 1
    available = len(ids) // body
    if available < count:
        raise UserError(f"{url}: calibration needs {count} samples of {length} tokens but the text gives "
                        f"{len(ids)} tokens ({available} samples)")
    picks = np.sort(np.random.default_rng(seed).choice(available, size=count, replace=False))
    out = np.empty((count, length), dtype=np.int64)
    out[:, 0] = bos
    for row, k in enumerate(picks):
        out[row, 1:] = ids[k * body:(k + 1) * body]
    return out
