"""`quantfab verify`: re-hash a published package against its manifest.json, or every blob of a store
against its address, and say file by file what holds.

A package is what a user downloads, maybe built elsewhere: every listed file is hashed, and files the
manifest does not list are reported too. A store blob is named by its sha256, so its name is its
manifest; one that no longer matches is moved aside (as a run would), so the next run rebuilds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from quantfab.tasks.errors import UserError
from quantfab.tasks.redact import redact
from quantfab.tasks.store import Blob, Store, filesystem, sha256_of

Status = Literal["ok", "altered", "missing", "extra"]


@dataclass(frozen=True)
class FileCheck:
    path: str
    status: Status
    detail: str = ""


def verify_package(url: str) -> list[FileCheck]:
    """Each file manifest.json lists (ok, altered or missing), then each file it does not list (extra)."""
    fs, root = filesystem(url, "the package")
    root = root.rstrip("/")
    try:
        manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
        listed = {f["path"]: (f["sha256"], int(f["size"])) for f in manifest["files"]}
    except FileNotFoundError:
        raise UserError(f"{redact(url)}: no manifest.json: not a quantfab package (or not all of one)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{redact(url)}/manifest.json: unreadable ({exc}): it vouches for nothing") from None
    try:
        present = {p[len(root) + 1:] for p in fs.find(root)} - {"manifest.json"}
    except FileNotFoundError:
        present = set()
    checks = []
    for path, (digest, size) in sorted(listed.items()):
        if path not in present:
            checks.append(FileCheck(path, "missing"))
            continue
        actual = sha256_of(fs, f"{root}/{path}")
        checks.append(FileCheck(path, "ok") if actual == digest else
                      FileCheck(path, "altered", f"sha256 {actual}, the manifest lists {digest} ({size:,} bytes)"))
    checks += [FileCheck(path, "extra", "not in manifest.json") for path in sorted(present - set(listed))]
    return checks


def verify_store(store: Store) -> list[FileCheck]:
    """Every blob hashed against its name (altered ones moved aside); leftovers of writes that never finished."""
    base = f"{store.root}/blobs/sha256"
    try:
        paths = sorted(store.fs.find(base))
    except FileNotFoundError:
        return []
    checks = []
    for path in paths:
        name = path[len(base) + 1:]
        digest = store.digest_at(path)
        if digest is None:
            checks.append(FileCheck(f"blobs/sha256/{name}", "extra", "not a blob: a write that never finished"))
            continue
        problem = store.check(Blob(digest=digest, size=store.fs.size(path)), whole=True)
        checks.append(FileCheck(f"blobs/sha256/{name}", "altered" if problem else "ok", problem or ""))
    return checks
