"""download: fetch a model's shards, config and tokenizer into the store.

Sources are fsspec URLs (local paths, file://, memory://, http(s)://, s3://, hf://) or synthetic://.
Every file is copied to a temporary name, checked against the size (and sha256, where the source
states one) and only then added to the store. Pickle checkpoints are refused unless allowed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import time
import uuid
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import fsspec

from quantfab.tasks import synthetic
from quantfab.tasks.errors import UserError
from quantfab.tasks.manifests import ModelManifest
from quantfab.tasks.modelio import ModelDir, read_safetensors_header
from quantfab.tasks.parallel import pmap
from quantfab.tasks.store import Blob, Store, sha256_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ATTEMPTS = 4


def redact(url: str) -> str:
    """The URL without credentials, fit for logs and manifests."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    query = "&".join(q for q in parts.query.split("&") if q and not q.lower().startswith(("token", "sig", "x-amz")))
    return urlunsplit(parts._replace(query=query))


def download(source: str, revision: str | None, include: list[str], allow_pickle: bool, store: Store) -> ModelManifest:
    work = Path(store.scratch()) / f"download-{uuid.uuid4().hex}"
    work.mkdir(parents=True)
    try:
        if source.startswith("synthetic://"):
            if urlsplit(source).netloc != "llama":
                raise UserError(f"{source}: synthetic sources are synthetic://llama?... (models) and synthetic://tokens (text)")
            rev = synthetic.write_llama(source, work)
            files = {p.name: store.put_file(p) for p in sorted(work.iterdir())}
        else:
            files, rev = _fetch(source, revision, include, allow_pickle, store, work)
    finally:
        for p in work.glob("*"):
            p.unlink()
        work.rmdir()
    return _manifest(source, rev, files, store)


def _fetch(source: str, revision: str | None, include: list[str], allow_pickle: bool, store: Store,
           work: Path) -> tuple[dict[str, Blob], str]:
    storage_options = {"revision": revision} if source.startswith("hf://") and revision else {}
    try:
        fs, root = fsspec.core.url_to_fs(source, **storage_options)
        listing = {Path(info["name"]).name: info for info in fs.ls(root, detail=True) if info.get("type") == "file"}
    except FileNotFoundError:
        raise UserError(f"{redact(source)}: no such model folder") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{redact(source)}: cannot list the model folder: {exc}") from None
    chosen = sorted(n for n in listing if any(fnmatch.fnmatch(n, pat) for pat in include))
    pickles = sorted(n for n in listing if n.endswith(PICKLE_SUFFIXES))
    if not any(n.endswith(".safetensors") for n in chosen):
        if pickles and not allow_pickle:
            raise UserError(f"{redact(source)}: only pickle checkpoints found ({', '.join(pickles)}); pickle files "
                            "can run code when loaded. Convert them to safetensors, or set model.allow_pickle: true")
        if pickles:
            raise UserError(f"{redact(source)}: model.allow_pickle is set, but loading pickle checkpoints is not "
                            "implemented yet; convert them to safetensors first")
        raise UserError(f"{redact(source)}: no .safetensors files match model.include {include}")
    if "config.json" not in chosen:
        raise UserError(f"{redact(source)}: no config.json in the model folder")
    fetch = partial(_fetch_one, fs, store=store, work=work, shown=redact(source))  # shards are independent
    files = dict(zip(chosen, pmap(fetch, [listing[name] for name in chosen])))
    rev = revision or _hf_revision(fs, root) or _content_revision(files, store)
    return files, rev


def _fetch_one(fs, info: dict, store: Store, work: Path, shown: str) -> Blob:
    """Copy one file with retries and backoff; verify size and stated sha256 before it enters the store."""
    name = Path(info["name"]).name
    expected_size = info.get("size")
    lfs = info.get("lfs") or {}
    expected_sha = lfs.get("sha256") if isinstance(lfs, dict) else None
    tmp = work / f"{name}.part"
    last: Exception | None = None
    for attempt in range(ATTEMPTS):
        try:
            fs.get_file(info["name"], str(tmp))
            size = tmp.stat().st_size
            if expected_size is not None and size != expected_size:
                raise OSError(f"got {size} bytes, the source states {expected_size}")
            if expected_sha and sha256_file(tmp) != expected_sha:
                raise OSError("sha256 differs from the one the source states")
            blob = store.put_file(tmp)
            tmp.unlink()
            return blob
        except OSError as exc:
            last = exc
            tmp.unlink(missing_ok=True)
            time.sleep(min(2 ** attempt, 8))
    raise UserError(f"{shown}/{name}: download failed after {ATTEMPTS} attempts: {last}")


def _hf_revision(fs, root: str) -> str | None:
    resolve = getattr(fs, "resolve_path", None)
    if resolve is None:
        return None
    try:
        return getattr(resolve(root), "revision", None)
    except Exception:  # noqa: BLE001 - any failure means "no hub revision"; fall back to content
        return None


def upstream_revision(source: str, revision: str | None = None) -> str:
    """The source's current revision, found without downloading its weights (the watch flow compares it).

    hf://: the commit sha the hub resolves ``revision`` (or main) to. Elsewhere: a digest of config.json
    and any *.index.json (their bytes) and of each weight file's name, size and etag (or mtime).
    """
    if source.startswith("synthetic://"):
        return "synthetic-" + hashlib.sha256(source.encode()).hexdigest()[:16]
    if source.startswith("hf://"):
        from huggingface_hub import HfApi

        repo = "/".join(source.removeprefix("hf://").split("/")[:2])
        return str(HfApi().model_info(repo, revision=revision).sha)
    try:
        fs, root = fsspec.core.url_to_fs(source)
        listing = sorted((info for info in fs.ls(root, detail=True) if info.get("type") == "file"),
                         key=lambda info: info["name"])
    except (OSError, ValueError) as exc:
        raise UserError(f"{redact(source)}: cannot list the model folder: {exc}") from None
    h = hashlib.sha256()
    for info in listing:
        name = Path(info["name"]).name
        if name == "config.json" or name.endswith(".index.json"):
            h.update(name.encode() + b"\0" + fs.cat_file(info["name"]) + b"\0")
        elif name.endswith(".safetensors"):
            stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
            h.update(f"{name}:{info.get('size')}:{stamp}\n".encode())
    return "upstream-" + h.hexdigest()[:16]


def _content_revision(files: dict[str, Blob], store: Store) -> str:
    """For sources with no commit ids: a digest of config and the weight files' digests."""
    h = hashlib.sha256()
    for name in sorted(files):
        if name == "config.json" or name.endswith((".safetensors", ".index.json")):
            h.update(f"{name}:{files[name].digest}\n".encode())
    return "sha256-" + h.hexdigest()[:16]


def materialize(store: Store, files: dict[str, Blob]) -> ModelDir:
    """A local folder of links to the model's blobs, named as in the source, for the HF loaders."""
    key = hashlib.sha256(json.dumps({k: v.digest for k, v in sorted(files.items())}).encode()).hexdigest()[:16]
    folder = Path(store.scratch()).parent / "models" / key
    if not (folder / ".complete").exists():
        tmp = folder.with_name(f"{key}.tmp-{uuid.uuid4().hex}")
        tmp.mkdir(parents=True)
        for name, blob in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(store.local_path(blob), tmp / name)
        (tmp / ".complete").touch()
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its folder is equivalent
            shutil.rmtree(tmp)
    return ModelDir(folder)


def _manifest(source: str, revision: str, files: dict[str, Blob], store: Store) -> ModelManifest:
    model = materialize(store, files)
    config = model.config()
    params = 0
    for name in files:
        if name.endswith(".safetensors"):
            params += sum(t.numel for t in read_safetensors_header(model.path / name).values())
    return ModelManifest(source=redact(source), revision=revision, files=files, model_type=config.model_type,
                         num_layers=int(config.num_hidden_layers), parameters=params)
