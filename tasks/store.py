"""A content-addressed store of blobs on any fsspec filesystem (a local directory by default).

Blobs live at ``blobs/sha256/ab/cdef...``; a blob is written to a temporary name and renamed into
place, so the store never holds a partial blob under a digest. Stages pass ``Blob`` references (digest
and size), never the bytes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from pathlib import Path

import fsspec
from pydantic import BaseModel, ConfigDict

from quantfab.tasks.errors import UserError
from quantfab.tasks.redact import redact

DEFAULT_STORE = "~/.cache/quantfab/store"
CHUNK = 8 << 20


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


class Blob(BaseModel):
    """A reference to bytes in the store."""

    model_config = ConfigDict(frozen=True)
    digest: str  # hex sha256
    size: int


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


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

    def has(self, blob: Blob) -> bool:
        key = self._key(blob.digest)
        return self.fs.exists(key) and self.fs.size(key) == blob.size

    def put_file(self, path: str | Path) -> Blob:
        """Add a local file; returns its reference. An existing blob is not written again."""
        digest, size = sha256_file(path), os.path.getsize(path)
        blob = Blob(digest=digest, size=size)
        if self.has(blob):
            return blob
        key = self._key(digest)
        tmp = f"{key}.tmp-{uuid.uuid4().hex}"
        self.fs.makedirs(os.path.dirname(key), exist_ok=True)
        self.fs.put_file(str(path), tmp)
        self.fs.mv(tmp, key)
        return blob

    def put_bytes(self, data: bytes) -> Blob:
        with tempfile.NamedTemporaryFile(dir=self.scratch(), delete=False) as f:
            f.write(data)
        try:
            return self.put_file(f.name)
        finally:
            os.unlink(f.name)

    def local_path(self, blob: Blob) -> Path:
        """A local file holding the blob: the blob itself for a local store, else a cached copy."""
        if self.is_local:
            path = Path(self._key(blob.digest))
            if not path.is_file():
                raise FileNotFoundError(f"store {self.url} has lost blob {blob.digest}")
            return path
        cached = Path(self.scratch()).parent / "blob-cache" / blob.digest
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp-{uuid.uuid4().hex}")
            self.fs.get_file(self._key(blob.digest), str(tmp))
            os.replace(tmp, cached)
        return cached

    def _ref(self, kind: str, key: str) -> str:
        return f"{self.root}/refs/{kind}/{key}.json"

    def put_ref(self, kind: str, key: str, blob: Blob) -> None:
        """Name a blob under ``kind/key`` (a checkpoint); written whole or not at all."""
        path = self._ref(kind, key)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            f.write(blob.model_dump_json().encode())
        self.fs.mv(tmp, path)

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
        base = Path(self.root) if self.is_local else Path(DEFAULT_STORE).expanduser() / "remote-results"
        path = base / "results"
        path.mkdir(parents=True, exist_ok=True)
        return path

