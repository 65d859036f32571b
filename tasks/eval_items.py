"""Task files of validate.tasks: JSONL read, checked line by line and digested, without torch.

Two kinds, one item per line:

- ``multiple_choice``: ``{"context": str, "choices": [str, ...], "gold": int}``, scored by the log-likelihood of
  each choice after the context, as lm-evaluation-harness scores its multiple-choice tasks;
- ``continuation``: ``{"prompt": str}``, whose greedy continuation is compared with the unquantized model's.

The stage keys on each file's sha256 (read when the key is computed), so editing a task file reruns validate, and
validate refuses a file whose bytes changed after the key was computed.
"""

from __future__ import annotations

import hashlib
from typing import Any

from quantfab.tasks.errors import UserError
from quantfab.tasks.texts import jsonl_records, read_text_bytes

MAX_TASK_BYTES = 256 * 2**20  # a task file is read whole: larger is a dataset, not an eval set


def read_task_file(url: str) -> bytes:
    raw = read_text_bytes(url, "task file", MAX_TASK_BYTES + 1)
    if len(raw) > MAX_TASK_BYTES:
        raise UserError(f"{url}: larger than {MAX_TASK_BYTES // 2**20} MiB; a task file holds items to score, "
                        "read whole (use its first items with validate.tasks[].items)")
    return raw


def task_digest(url: str) -> str:
    return hashlib.sha256(read_task_file(url)).hexdigest()


def task_items(url: str, kind: str, limit: int | None, expected_sha256: str | None = None) -> list[dict[str, Any]]:
    """The file's first ``limit`` items (all when None), each checked for ``kind``'s fields; a line that is not
    such an item is named by file and line. With ``expected_sha256``, a file whose bytes differ is refused."""
    raw = read_task_file(url)
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise UserError(f"{url}: the task file changed after this build's cache keys were computed (sha256 "
                        f"{expected_sha256[:12]}…, now {hashlib.sha256(raw).hexdigest()[:12]}…): run the build again")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{url}: not UTF-8 text (byte {exc.start})") from None
    items = []
    for n, record in jsonl_records(url, text.splitlines()):
        items.append({**CHECKS[kind](f"{url}:{n}", record), "line": n})
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise UserError(f"{url}: holds no items")
    return items


def _multiple_choice(where: str, record: Any) -> dict[str, Any]:
    expected = 'an object {"context": str, "choices": [str, str, ...], "gold": index of the right choice}'
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected {expected}")
    context, choices, gold = record.get("context"), record.get("choices"), record.get("gold")
    if not isinstance(context, str):
        raise UserError(f"{where}: field 'context' must be a string; expected {expected}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{where}: field 'choices' must list at least two non-empty strings; expected {expected}")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise UserError(f"{where}: field 'gold' must be an index into 'choices' (0 to {len(choices) - 1}), "
                        f"got {gold!r}")
    return {"context": context, "choices": choices, "gold": gold}


def _continuation(where: str, record: Any) -> dict[str, Any]:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise UserError(f'{where}: expected an object {{"prompt": non-empty string}}')
    return {"prompt": record["prompt"]}


CHECKS = {"multiple_choice": _multiple_choice, "continuation": _continuation}
