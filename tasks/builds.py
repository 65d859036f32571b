"""The store's build history: one record per run of a recipe, what `quantfab gc` keeps and drops by.

``builds/<recipe>/<id>.json`` is written when a run starts and rewritten as each stage finishes, with
the stage results and blobs the run used; it ends ``published`` or ``failed``. A run holds the lock
``build-<id>`` to its end, so a record still ``running`` whose lock nobody holds is a run that was
killed: ``interrupted``, and its layer checkpoints are what a rerun resumes from.

A stage's blobs are recorded under the store's ``gc`` lock, and then looked for: gc removes blobs under
the same lock, so a run either records a blob before gc looks (and gc keeps it) or finds it gone after
(and recomputes the stage), never uses a blob that is being removed.
"""

from __future__ import annotations

import time
import uuid
from contextlib import ExitStack
from typing import Literal

from pydantic import BaseModel

from quantfab.tasks.locks import held, stage_lock
from quantfab.tasks.store import Blob, Store

Status = Literal["running", "published", "failed"]


class BuildRecord(BaseModel):
    id: str
    recipe: str
    started: float  # unix time
    updated: float
    status: Status = "running"
    destination: str  # redacted
    manifest_sha256: str | None = None  # the published package's manifest.json
    results: dict[str, str] = {}  # stage -> cache key (its Prefect result record)
    blobs: dict[str, int] = {}  # digest -> size, every blob the run produced or reused

    def state(self, store: Store) -> str:
        """running, published, failed, or interrupted (a running record whose run is gone)."""
        if self.status == "running" and not held(store, f"build-{self.id}"):
            return "interrupted"
        return self.status


def record_path(store: Store, recipe: str, build_id: str) -> str:
    return f"{store.root}/builds/{recipe}/{build_id}.json"


def pin_path(store: Store, build_id: str) -> str:
    return f"{store.root}/pins/{build_id}"


def read_builds(store: Store) -> list[BuildRecord]:
    """Every build record of the store, oldest first (records torn by a crash mid-write are skipped)."""
    records = []
    for path in store.fs.glob(f"{store.root}/builds/*/*.json"):
        try:
            records.append(BuildRecord.model_validate_json(store.fs.cat_file(path)))
        except (ValueError, FileNotFoundError):
            continue
    return sorted(records, key=lambda r: (r.started, r.id))


def pinned(store: Store) -> set[str]:
    return {path.rsplit("/", 1)[-1] for path in store.fs.glob(f"{store.root}/pins/*")}


class BuildLog:
    """The record of the run in progress; enter it for the run's whole length."""

    def __init__(self, store: Store, recipe: str, destination: str):
        self.store = store
        now = time.time()
        build_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}-{uuid.uuid4().hex[:8]}"
        self.record = BuildRecord(id=build_id, recipe=recipe, started=now, updated=now, destination=destination)
        self._held = ExitStack()

    def __enter__(self) -> BuildLog:
        self._held.enter_context(stage_lock(self.store, f"build-{self.record.id}"))
        self._save()
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        try:
            if kind is not None or self.record.status == "running":
                self.finish("failed")
        finally:
            self._held.close()

    def hold(self, stage: str, key: str, blobs: list[Blob]) -> list[Blob]:
        """Record that this run uses ``blobs`` (stage ``stage``'s result, cache key ``key``); the ones
        that are gone by then (a gc removed them meanwhile), which the stage must recompute."""
        with stage_lock(self.store, "gc"):
            self.record.results[stage] = key
            self.record.blobs.update({b.digest: b.size for b in blobs})
            self._save()
            return [b for b in blobs if not self.store.exists(b)]

    def finish(self, status: Status, manifest_sha256: str | None = None) -> None:
        self.record.status, self.record.manifest_sha256 = status, manifest_sha256
        self._save()

    def _save(self) -> None:
        self.record.updated = time.time()
        path = record_path(self.store, self.record.recipe, self.record.id)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.store.writing():
            self.store.fs.pipe_file(tmp, self.record.model_dump_json(indent=1).encode())
            self.store.fs.mv(tmp, path)
