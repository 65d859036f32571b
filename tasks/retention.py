"""`quantfab gc`: bound the store by a retention policy, safely while other runs use it.

Kept: every live run's blobs and anything written since the oldest live run started; the builds a
published package still comes from (its destination's manifest.json is the one the build wrote); pinned
builds; and per recipe the last ``keep_last`` builds, published, failed or interrupted alike (an
interrupted one keeps the checkpoints a rerun resumes from). ``max_size`` then drops the oldest of those
last builds until the store fits, never a published, pinned or live one. Everything else goes: blobs no
kept build uses, with their verification records and the stage results (cache records) that named them,
checkpoints no kept build wrote, quarantined blobs older than ``quarantine_days``, and leftovers of killed
runs. A live run's blobs are safe by the ``gc`` lock's protocol (see tasks/builds.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from quantfab.tasks.builds import BuildRecord, pin_path, pinned, read_builds, record_path
from quantfab.tasks.errors import UserError
from quantfab.tasks.locks import stage_lock
from quantfab.tasks.redact import redact
from quantfab.tasks.store import Store, filesystem

SKEW_SECONDS = 300  # between this host's clock and an object store's timestamps (a local store has none)


class Policy(BaseModel):
    keep_last: int = Field(3, ge=1, description="builds kept per recipe, newest first")
    max_size: int | None = Field(None, ge=0, description="bytes the store may hold at most")
    quarantine_days: float = Field(14, ge=0, description="age after which moved-aside blobs are removed")


@dataclass
class BuildVerdict:
    record: BuildRecord
    state: str  # running, published, failed, interrupted
    keep: bool
    why: str
    size: int  # bytes of blobs only this build (of those dropped) uses; its total when kept


@dataclass
class Collection:
    builds: list[BuildVerdict]
    removed: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))  # kind -> (path, bytes)
    size_before: int = 0
    size_after: int = 0
    unmet: str = ""  # why max_size could not be reached

    @property
    def freed(self) -> int:
        return sum(size for files in self.removed.values() for _, size in files)


def human(n: float) -> str:
    """1,234 B, 12.3 KiB, 45.6 MiB, 1.2 GiB: binary units, as --max-size reads them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def _mtime(info: dict) -> float:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if value is not None and hasattr(value, "timestamp"):
            return value.timestamp()
    return time.time()  # unknown: treated as new, so never removed for its age


def _files(store: Store, folder: str) -> dict[str, dict]:
    """Every file under ``folder`` of the store, path -> fsspec info."""
    root = f"{store.root}/{folder}"
    if not store.fs.exists(root):
        return {}
    return {path: info for path, info in store.fs.find(root, detail=True).items() if info.get("type") != "directory"}


def _published_here(record: BuildRecord) -> str | None:
    """Why the package at the record's destination counts as this build's ("published at ..."), or None."""
    if record.status != "published" or record.manifest_sha256 is None:
        return None
    try:
        fs, root = filesystem(record.destination, "package.destination")
        manifest = fs.cat_file(f"{root.rstrip('/')}/manifest.json")
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - unreachable or forbidden: keep it rather than guess
        return f"its destination could not be read ({type(exc).__name__}): kept"
    if hashlib.sha256(manifest).hexdigest() == record.manifest_sha256:
        return f"published at {redact(record.destination)}"
    return None


def collect(store: Store, policy: Policy, dry_run: bool = False) -> Collection:
    """Apply ``policy`` to ``store`` (or, with ``dry_run``, only say what it would remove)."""
    with stage_lock(store, "gc"):
        blobs = _files(store, "blobs/sha256")  # listed before the records: a run records itself before it writes
        records = read_builds(store)
        if not records and blobs:
            raise UserError(f"the store {redact(store.url)} holds blobs but no build records (built before quantfab "
                            "recorded builds): run each recipe once (a cached run takes seconds and records what it "
                            "uses), then gc")
        pins = pinned(store)
        verdicts = _judge(store, records, pins, policy)
        live = [v.record for v in verdicts if v.state == "running"]
        margin = 0 if store.is_local else SKEW_SECONDS
        horizon = min((r.started for r in live), default=time.time()) - margin
        digests = {path: store.digest_at(path) for path in blobs}
        sizes = {d: int(blobs[path]["size"]) for path, d in digests.items() if d}
        recent = {d for path, d in digests.items() if d and _mtime(blobs[path]) >= horizon}
        out = Collection(builds=verdicts, size_before=sum(sizes.values()))
        keeper = _Keeper(_checkpoints(store), recent, horizon, margin)
        if policy.max_size is not None:
            out.unmet = _fit(verdicts, keeper, sizes, policy.max_size)
        keep = keeper.blobs(verdicts)
        for verdict in verdicts:
            verdict.size = sum(verdict.record.blobs.get(d, 0) for d in verdict.record.blobs
                               if verdict.keep or d not in keep)
        out.size_after = sum(size for digest, size in sizes.items() if digest in keep)
        _plan_removals(store, out, blobs, keep, keeper, policy)
        if not dry_run:
            for kind in ("builds", "checkpoints", "results", "blobs", "verified", "quarantine", "leftovers"):
                for path, _ in out.removed.get(kind, []):
                    try:
                        store.fs.rm(path, recursive=True)
                    except FileNotFoundError:
                        pass
            for build_id in pins - {v.record.id for v in verdicts}:
                store.fs.rm(pin_path(store, build_id))
        return out


def _judge(store: Store, records: list[BuildRecord], pins: set[str], policy: Policy) -> list[BuildVerdict]:
    """Keep or drop each build by the policy's rules other than the size cap, with the reason."""
    newest: dict[str, list[str]] = defaultdict(list)
    for record in reversed(records):
        newest[record.recipe].append(record.id)
    verdicts = []
    for record in records:
        state = record.state(store)
        rank = newest[record.recipe].index(record.id)
        published = _published_here(record)
        if state == "running":
            keep, why = True, "a live run"
        elif record.id in pins:
            keep, why = True, "pinned"
        elif published:
            keep, why = True, published
        elif rank < policy.keep_last:
            keep, why = True, f"one of the last {policy.keep_last} of {record.recipe}"
        else:
            keep, why = False, f"older than the last {policy.keep_last} of {record.recipe}"
        verdicts.append(BuildVerdict(record, state, keep, why, 0))
    return verdicts


def _checkpoints(store: Store) -> dict[str, tuple[str, float]]:
    """Each layer checkpoint: ref path -> (the blob digest it names, when it was written)."""
    found = {}
    for path, info in _files(store, "refs").items():
        try:
            found[path] = (json.loads(store.fs.cat_file(path))["digest"], _mtime(info))
        except (ValueError, KeyError, FileNotFoundError):
            found[path] = ("", _mtime(info))
    return found


@dataclass
class _Keeper:
    """What is kept besides the kept builds' own blobs: recent blobs, and the checkpoints kept builds wrote."""

    checkpoints: dict[str, tuple[str, float]]  # ref path -> (blob digest, when written)
    recent: set[str]  # digests written since the horizon
    horizon: float  # the oldest live run's start (less the clock margin), else now
    margin: float

    def kept_checkpoints(self, verdicts: list[BuildVerdict]) -> set[str]:
        """Checkpoints written during a kept build (any time since the start of an interrupted or live one)."""
        windows = [(v.record.started - self.margin,
                    float("inf") if v.state in ("running", "interrupted") else v.record.updated + self.margin)
                   for v in verdicts if v.keep]
        return {path for path, (_, written) in self.checkpoints.items()
                if written >= self.horizon or any(start <= written <= end for start, end in windows)}

    def blobs(self, verdicts: list[BuildVerdict]) -> set[str]:
        keep = set(self.recent)
        for verdict in verdicts:
            if verdict.keep:
                keep.update(verdict.record.blobs)
        keep.update(self.checkpoints[path][0] for path in self.kept_checkpoints(verdicts))
        return keep


def _fit(verdicts: list[BuildVerdict], keeper: _Keeper, sizes: dict[str, int], cap: int) -> str:
    """Drop the oldest builds kept only for being recent until the store fits ``cap``; why it cannot, if so."""
    for verdict in verdicts:  # oldest first
        if sum(sizes.get(d, 0) for d in keeper.blobs(verdicts)) <= cap:
            return ""
        if verdict.keep and verdict.why.startswith("one of the last"):
            verdict.keep, verdict.why = False, f"over the size cap ({human(cap)})"
    left = sum(sizes.get(d, 0) for d in keeper.blobs(verdicts))
    if left <= cap:
        return ""
    return (f"the store still holds {human(left)}, over the cap of {human(cap)}: "
            "the rest belongs to live runs, pinned builds or published packages")


def _plan_removals(store: Store, out: Collection, blobs: dict[str, dict], keep: set[str], keeper: _Keeper,
                   policy: Policy) -> None:
    """Fill ``out.removed`` with every path the policy removes."""
    removed = out.removed
    for verdict in out.builds:
        if not verdict.keep:
            removed["builds"].append((record_path(store, verdict.record.recipe, verdict.record.id), 0))
    kept_checkpoints = keeper.kept_checkpoints(out.builds)
    removed["checkpoints"] += [(path, 0) for path in keeper.checkpoints if path not in kept_checkpoints]
    for path, info in blobs.items():
        digest = store.digest_at(path)
        if digest is None:
            if _mtime(info) < keeper.horizon:
                removed["leftovers"].append((path, int(info["size"])))
        elif digest not in keep:
            removed["blobs"].append((path, int(info["size"])))
            removed["verified"].append((store.verified_path(digest), 0))
    results = {key for v in out.builds if v.keep for key in v.record.results.values()}
    for path, info in _files(store, "results").items():
        if os.path.basename(path) not in results and _mtime(info) < keeper.horizon:
            removed["results"].append((path, int(info["size"])))
    too_old = time.time() - policy.quarantine_days * 86400
    for path, info in _files(store, "quarantine").items():
        if _mtime(info) < too_old:
            removed["quarantine"].append((path, int(info["size"])))
    for folder in ("tmp", "models"):  # work files and model folders of links left by killed runs
        if store.is_local and os.path.isdir(f"{store.root}/{folder}"):
            for entry in os.scandir(f"{store.root}/{folder}"):
                if entry.stat(follow_symlinks=False).st_mtime < keeper.horizon and (
                        folder == "tmp" or _dangling(entry.path, keep)):
                    size = entry.stat(follow_symlinks=False).st_size if entry.is_file(follow_symlinks=False) else 0
                    removed["leftovers"].append((entry.path, size))


def _dangling(folder: str, keep: set[str]) -> bool:
    """Whether a model folder of links points at a blob gc removes (it is rebuilt when needed)."""
    for base, _, names in os.walk(folder):
        for name in names:
            link = os.path.join(base, name)
            digest = Store.digest_at(os.readlink(link)) if os.path.islink(link) else None
            if digest is not None and digest not in keep:
                return True
    return False
