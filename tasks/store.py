"""A content-addressed store of blobs on any fsspec filesystem (a local directory by default).

Blobs live at ``blobs/sha256/ab/cdef...``; a blob is written to a temporary name and renamed into
place, so the store never holds a partial blob under a digest. Stages pass ``Blob`` references (digest
and size), never the bytes.

Nothing leaves the store unchecked. A cache hit costs a cheap check: the blob's size, and its file
stamp (size, times, inode) against the one recorded when it was last hashed whole (``verified/``);
a changed stamp is hashed again. A blob read as a stage's input, or copied out, is hashed whole (once
per process while its stamp holds). A blob that no longer matches its digest is moved aside to
``quarantine/`` (never deleted) and reported, so the stage that made it runs again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import fsspec
from pydantic import BaseModel, ConfigDict

from quantfab.tasks.errors import UserError
from quantfab.tasks.redact import redact

DEFAULT_STORE = "~/.cache/quantfab/store"
CHUNK = 8 << 20
FULL_DISK = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}
_VERIFIED: dict[str, str] = {}  # blob path -> its stamp when this process last hashed it whole


def filesystem(url: str, what: str, **options: object) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem and path for ``url``. An unknown protocol, or one whose package is not
    installed (s3:// without s3fs), is the user's to fix: a clear error naming ``what``, not a traceback."""
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise UserError(f"{what}: {redact(url)}: {exc} (install it beside quantfab)") from None
    except ValueError as exc:
        raise UserError(f"{what}: {redact(url)}: {exc}") from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (where renames are atomic and paths are real files)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


def file_stamp(fs: fsspec.AbstractFileSystem, path: str, identity: bool) -> tuple[int, str] | None:
    """(size, stamp) of a file, None when absent. The stamp changes whenever the file is written:
    size and modification time, and with ``identity`` the inode and change time, which no copy or
    ``touch`` can restore (for the store; a destination may legitimately be copied elsewhere)."""
    if is_local(fs):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        marks = [st.st_mtime_ns, st.st_ctime_ns, st.st_ino] if identity else [st.st_mtime_ns]
        return st.st_size, ":".join(map(str, [st.st_size, *marks]))
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    marks = [info.get(k) for k in ("ETag", "etag", "generation", "mtime", "LastModified", "last_modified", "created")]
    return int(info["size"]), ":".join(str(m) for m in [info["size"], *marks] if m is not None)


def _copy_hashing(src: Any, dst: Any = None) -> str:
    """sha256 of what ``src`` holds, read in chunks (and written to ``dst`` as it goes, if given)."""
    h = hashlib.sha256()
    while chunk := src.read(CHUNK):
        h.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return _copy_hashing(f)


def sha256_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if is_local(fs):
        return sha256_file(path)
    with fs.open(path, "rb") as f:
        return _copy_hashing(f)


class Blob(BaseModel):
    """A reference to bytes in the store."""

    model_config = ConfigDict(frozen=True)
    digest: str  # hex sha256
    size: int


class BlobUnavailable(Exception):
    """A blob a stage reads is missing, or no longer matches its digest (then it was moved aside): the
    flow reruns the stage that made it."""

    def __init__(self, digest: str, problem: str):
        super().__init__(digest, problem)
        self.digest, self.problem = digest, problem

    def __str__(self) -> str:
        return f"blob sha256 {self.digest}: {self.problem}"


class WriteFailed(UserError):
    """A write to the store or the destination failed (a full disk, a quota, an I/O error); what was
    being written was removed, and the message says where and how much space there was."""


def free_bytes(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    """Free space on the local filesystem holding ``path`` (its nearest existing folder); None elsewhere."""
    if not is_local(fs):
        return None
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


@contextmanager
def reporting_full_disks(what: str, fs: fsspec.AbstractFileSystem, root: str, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk or an I/O error while writing to ``what`` into a WriteFailed that says so."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (*FULL_DISK, errno.EIO, errno.EROFS):
            raise
        free = free_bytes(fs, root)
        space = f"; {free / 2**20:,.1f} MiB free there" if free is not None else ""
        need = f", {needed / 2**20:,.1f} MiB needed" if needed is not None else ""
        raise WriteFailed(f"{what} ({redact(root)}): write failed: "
                          f"{FULL_DISK.get(exc.errno, os.strerror(exc.errno or 0))}{need}{space}; "
                          "the partial file was removed") from None


class Store:
    def __init__(self, url: str | None = None):
        url = url or os.environ.get("QUANTFAB_STORE") or DEFAULT_STORE
        if "://" not in url:
            url = str(Path(url).expanduser().resolve())
        self.url = url
        self.fs, self.root = filesystem(url, "the store (--store or QUANTFAB_STORE)")
        self.is_local = is_local(self.fs)

    def _key(self, digest: str) -> str:
        return f"{self.root}/blobs/sha256/{digest[:2]}/{digest[2:]}"

    @staticmethod
    def digest_at(path: str) -> str | None:
        """The digest a blob path (``.../ab/cdef...``) names; None for anything else (a write's temporary file)."""
        digest = "".join(path.rstrip("/").split("/")[-2:])
        return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None

    def verified_path(self, digest: str) -> str:
        """Where the stamp of the blob's last whole hash is recorded."""
        return f"{self.root}/verified/{digest[:2]}/{digest[2:]}"

    def _recorded_stamp(self, digest: str) -> str | None:
        try:
            return self.fs.cat_file(self.verified_path(digest)).decode()
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def _verified(self, key: str, digest: str, stamp: str) -> None:
        """Remember that the file at ``key`` with ``stamp`` hashed to its digest (here, and in the store)."""
        _VERIFIED[key] = stamp
        record = self.verified_path(digest)
        self.fs.makedirs(os.path.dirname(record), exist_ok=True)
        self.fs.pipe_file(record, stamp.encode())

    def check(self, blob: Blob, whole: bool = False, move_aside: bool = True) -> str | None:
        """None when the blob is present and intact, else what is wrong (a damaged blob is moved aside,
        unless ``move_aside`` is off: plan only looks).

        The cheap check compares size and stamp with those recorded at its last whole hash; ``whole``
        hashes it unless this process already did at this stamp.
        """
        damaged = self.quarantine if move_aside else lambda _blob, why: why
        key = self._key(blob.digest)
        found = file_stamp(self.fs, key, identity=True)
        if found is None:
            return "missing from the store"
        size, stamp = found
        if size != blob.size:
            return damaged(blob, f"{'truncated' if size < blob.size else 'grown'} to {size:,} bytes "
                                         f"(written as {blob.size:,})")
        if _VERIFIED.get(key) == stamp or (not whole and self._recorded_stamp(blob.digest) == stamp):
            return None
        actual = sha256_of(self.fs, key)
        if actual != blob.digest:
            return damaged(blob, f"altered: its {size:,} bytes now hash to sha256 {actual}")
        self._verified(key, blob.digest, stamp)
        return None

    def exists(self, blob: Blob) -> bool:
        """Whether the blob's file is there at all (no check of its bytes)."""
        return self.fs.exists(self._key(blob.digest))

    def has(self, blob: Blob) -> bool:
        return self.check(blob) is None

    def quarantine(self, blob: Blob, why: str) -> str:
        """Move a damaged blob aside (kept for inspection, out of every build's way); ``why``, and where it went."""
        aside = f"{self.root}/quarantine/{blob.digest}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        self.fs.makedirs(os.path.dirname(aside), exist_ok=True)
        try:
            self.fs.mv(self._key(blob.digest), aside)
        except FileNotFoundError:
            return f"{why}; already moved aside by another run"
        if self.fs.exists(self.verified_path(blob.digest)):
            self.fs.rm(self.verified_path(blob.digest))
        return f"{why}; moved aside to {redact(aside)}"

    def put_file(self, path: str | Path) -> Blob:
        """Add a local file; returns its reference. An intact existing blob is not written again."""
        digest, size = sha256_file(path), os.path.getsize(path)
        blob = Blob(digest=digest, size=size)
        if self.has(blob):
            return blob
        key = self._key(digest)
        tmp = f"{key}.tmp-{uuid.uuid4().hex}"
        with self.writing(size):  # outside: free space is measured once the partial copy is gone
            try:
                self.fs.makedirs(os.path.dirname(key), exist_ok=True)
                self.fs.put_file(str(path), tmp)
                self.fs.mv(tmp, key)
            finally:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
        found = file_stamp(self.fs, key, identity=True)
        if found is not None and found[0] == size:
            self._verified(key, digest, found[1])
        return blob

    def put_bytes(self, data: bytes) -> Blob:
        with self.scratch_file() as path:
            with self.writing(len(data)):
                path.write_bytes(data)
            return self.put_file(path)

    def writing(self, needed: int | None = None):
        """Where store writes fail on a full disk: a WriteFailed naming the store and its free space."""
        return reporting_full_disks("the store", self.fs, self.root, needed)

    @contextmanager
    def scratch_file(self, suffix: str = "") -> Iterator[Path]:
        """A fresh work file's path in scratch, removed afterwards whatever happens (a full disk included)."""
        path = Path(self.scratch()) / f"work-{uuid.uuid4().hex}{suffix}"
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def local_path(self, blob: Blob, verify: bool = True) -> Path:
        """A local file holding the blob (the blob itself for a local store, else a cached copy),
        hashed whole first unless ``verify`` is off (for readers of headers only, such as plan)."""
        if self.is_local:
            problem = self.check(blob, whole=True) if verify else (
                None if os.path.isfile(self._key(blob.digest)) else "missing from the store")
            if problem:
                raise BlobUnavailable(blob.digest, f"{problem} (store {redact(self.url)})")
            return Path(self._key(blob.digest))
        cached = Path(self.scratch()).parent / "blob-cache" / blob.digest
        found = file_stamp(fsspec.filesystem("file"), str(cached), identity=True)
        if found is not None and (not verify or _VERIFIED.get(str(cached)) == found[1]):
            return cached
        if found is not None and found[0] == blob.size and sha256_file(cached) == blob.digest:
            _VERIFIED[str(cached)] = found[1]
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp-{uuid.uuid4().hex}")
        try:
            with reporting_full_disks("the local copy of a remote store's blob", fsspec.filesystem("file"),
                                      str(cached.parent), blob.size):
                with open(tmp, "wb") as dst:
                    self._copy_checked(blob, dst)
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
        _VERIFIED[str(cached)] = file_stamp(fsspec.filesystem("file"), str(cached), identity=True)[1]
        return cached

    def copy_out(self, blob: Blob, fs: fsspec.AbstractFileSystem, path: str) -> None:
        """Copy a blob to ``path`` on ``fs`` (a package being published), hashing the bytes as they go:
        a blob that no longer matches its digest is moved aside and nothing of it is left at ``path``."""
        try:
            with reporting_full_disks("package.destination", fs, path, blob.size):
                with fs.open(path, "wb") as dst:
                    self._copy_checked(blob, dst)
        except BlobUnavailable:
            if fs.exists(path):
                fs.rm(path)
            raise

    def _copy_checked(self, blob: Blob, dst: Any) -> None:
        """Write the blob's bytes to the open file ``dst``, hashing them as they go: a blob that is missing, or
        no longer matches its digest (then moved aside), raises BlobUnavailable once its bytes are written."""
        try:
            with self.fs.open(self._key(blob.digest), "rb") as src:
                actual = _copy_hashing(src, dst)
        except FileNotFoundError:
            raise BlobUnavailable(blob.digest, f"missing from the store {redact(self.url)}") from None
        if actual != blob.digest:
            raise BlobUnavailable(blob.digest, self.quarantine(blob, f"altered: its bytes hash to sha256 {actual}"))

    def _ref(self, kind: str, key: str) -> str:
        return f"{self.root}/refs/{kind}/{key}.json"

    def put_ref(self, kind: str, key: str, blob: Blob) -> None:
        """Name a blob under ``kind/key`` (a checkpoint); written whole or not at all."""
        path = self._ref(kind, key)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with self.writing():
                with self.fs.open(tmp, "wb") as f:
                    f.write(blob.model_dump_json().encode())
                self.fs.mv(tmp, path)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def get_ref(self, kind: str, key: str) -> Blob | None:
        """The blob named ``kind/key``, or None when there is none or its bytes left the store."""
        path = self._ref(kind, key)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            blob = Blob.model_validate_json(f.read())
        return blob if self.has(blob) else None

    def read_bytes(self, blob: Blob) -> bytes:
        return self.local_path(blob).read_bytes()

    def scratch(self) -> str:
        """A local directory for work files (on the same filesystem as a local store, so renames are atomic)."""
        base = Path(self.root) if self.is_local else Path(DEFAULT_STORE).expanduser()
        path = base / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def results_dir(self) -> Path:
        """Where Prefect persists stage results (the cache records), beside a local store."""
        return self._local_dir("results")

    def memo_dir(self) -> Path:
        """Where plan memoizes what it derives from a model's config (tasks/model_structure.py)."""
        return self._local_dir("memo")

    def _local_dir(self, name: str) -> Path:
        """A folder in a local store, or under the default store's remote-results/ for a remote one."""
        base = Path(self.root) if self.is_local else Path(DEFAULT_STORE).expanduser() / "remote-results"
        path = base / name
        path.mkdir(parents=True, exist_ok=True)
        return path
