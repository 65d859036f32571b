"""download: fetch a model's shards, config and tokenizer into the store.

Sources are fsspec URLs (local paths, file://, memory://, http(s)://, s3://, hf://) or synthetic://.
Every file is copied to a temporary name, checked against the size (and sha256, where the source
states one) and only then added to the store. Pickle checkpoints are refused unless allowed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any


from quantfab.tasks import synthetic
from quantfab.tasks.errors import UserError
from quantfab.tasks.manifests import ModelManifest
from quantfab.tasks.modelio import ModelDir, check_against_config, read_safetensors_header
from quantfab.tasks.parallel import pmap
from quantfab.tasks.redact import redact
from quantfab.tasks.store import FULL_DISK, Blob, Store, filesystem, sha256_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
ATTEMPTS = 4
CHUNK = 1 << 22


def download(source: str, revision: str | None, include: list[str], allow_pickle: bool, store: Store,
             pinned: dict[str, str] | None = None) -> ModelManifest:
    work = Path(store.scratch()) / f"download-{uuid.uuid4().hex}"
    work.mkdir(parents=True)
    try:
        if source.startswith("synthetic://"):
            rev = synthetic.write_model(source, work)
            files = {p.name: store.put_file(p) for p in sorted(work.iterdir())}
        else:
            files, rev = _fetch(source, revision, include, allow_pickle, store, work, pinned or {})
    finally:
        for p in work.glob("*"):
            p.unlink()
        work.rmdir()
    return _manifest(source, rev, files, store)


def _fetch(source: str, revision: str | None, include: list[str], allow_pickle: bool, store: Store,
           work: Path, pinned: dict[str, str]) -> tuple[dict[str, Blob], str]:
    storage_options = {"revision": revision} if source.startswith("hf://") and revision else {}
    try:
        fs, root = filesystem(source, "model.source", **storage_options)
        infos = _retrying(lambda: fs.ls(root, detail=True), f"{redact(source)}: listing the model folder")
    except FileNotFoundError:
        raise UserError(f"{redact(source)}: no such model folder") from None
    except ValueError as exc:
        raise UserError(f"{redact(source)}: cannot list the model folder: {exc}") from None
    listing = {Path(info["name"]).name: info for info in infos if info.get("type") == "file"}
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
    chosen_pickles = [n for n in chosen if n.endswith(PICKLE_SUFFIXES)]
    if chosen_pickles:
        raise UserError(f"{redact(source)}: model.include picks pickle file(s) {', '.join(chosen_pickles)}, which can "
                        "run code when loaded; narrow model.include to safetensors, JSON and tokenizer files")
    if "config.json" not in chosen:
        raise UserError(f"{redact(source)}: no config.json in the model folder")
    unknown = sorted(set(pinned) - set(chosen))
    if unknown:
        raise UserError(f"{redact(source)}: model.sha256 pins {', '.join(unknown)}, which the source does not "
                        f"list among the files fetched ({', '.join(chosen)})")
    fetch = partial(_fetch_one, fs, store=store, work=work, shown=redact(source).rstrip("/"), pinned=pinned)
    files = dict(zip(chosen, pmap(fetch, [listing[name] for name in chosen])))
    rev = revision or _hf_revision(fs, root) or _content_revision(files, store)
    return files, rev


def _transient() -> tuple[type[BaseException], ...]:
    """Errors worth another attempt: the network's (fsspec's HTTP raises aiohttp's), not a missing file."""
    kinds: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        import aiohttp

        kinds.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(kinds)


def _pause(attempt: int) -> None:
    """Exponential backoff: 1, 2, 4, 8 s (times QUANTFAB_RETRY_SECONDS, 1 by default)."""
    time.sleep(min(2 ** attempt, 8) * float(os.environ.get("QUANTFAB_RETRY_SECONDS", "1")))


def _retrying(call: Any, what: str) -> Any:
    last: BaseException | None = None
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except FileNotFoundError:
            raise
        except _transient() as exc:
            last = exc
            _pause(attempt)
    raise UserError(f"{what} failed after {ATTEMPTS} attempts: {redact(str(last))}")


def _fetch_one(fs, info: dict, store: Store, work: Path, shown: str, pinned: dict[str, str]) -> Blob:
    """Copy one file; after a dropped connection, resume where it stopped with a ranged read (fsspec seeks
    with Range requests). Size and sha256 (the recipe's pin, or the hub's LFS digest) are checked before
    it enters the store; bytes that do not match are thrown away and fetched again."""
    name = Path(info["name"]).name
    expected_size = info.get("size")
    if expected_size is None:  # an HTTP index lists names only; the size comes from a HEAD request
        expected_size = _retrying(lambda: fs.size(info["name"]), f"{shown}/{name}: reading its size")
    lfs = info.get("lfs") or {}
    expected_sha = pinned.get(name) or (lfs.get("sha256") if isinstance(lfs, dict) else None)
    tmp = work / f"{name}.part"
    tmp.unlink(missing_ok=True)
    last: BaseException | None = None
    for attempt in range(ATTEMPTS):
        try:
            have = tmp.stat().st_size if tmp.exists() else 0
            with fs.open(info["name"], "rb", block_size=CHUNK) as src, tmp.open("ab") as dst:
                if have:
                    src.seek(have)
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
            size = tmp.stat().st_size
            if expected_size is not None and size != expected_size:
                raise OSError(f"got {size} bytes, the source states {expected_size}")
            if expected_sha and sha256_file(tmp) != expected_sha:
                tmp.unlink()
                raise OSError(f"sha256 differs from {'model.sha256' if name in pinned else 'the source'}'s {expected_sha}")
            blob = store.put_file(tmp)
            tmp.unlink()
            return blob
        except _transient() as exc:
            if getattr(exc, "errno", None) in FULL_DISK:
                tmp.unlink(missing_ok=True)
                raise  # another attempt would fill the same disk: the stage reports it
            last = exc
            if tmp.exists() and expected_size is not None and tmp.stat().st_size >= expected_size:
                tmp.unlink()  # a whole (or overlong) copy that failed its checks: nothing to resume
            _pause(attempt)
    tmp.unlink(missing_ok=True)
    raise UserError(f"{shown}/{name}: download failed after {ATTEMPTS} attempts: {redact(str(last))}")


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
        fs, root = filesystem(source, "model.source")
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


def materialize(store: Store, files: dict[str, Blob], verify: bool = True) -> ModelDir:
    """A local folder of links to the model's blobs, named as in the source, for the HF loaders.

    Each blob is hashed first (once per process) unless ``verify`` is off, for readers of config and
    headers only (plan, and the flow deciding what calibrate measures).
    """
    paths = {name: store.local_path(blob, verify) for name, blob in files.items()}
    key = hashlib.sha256(json.dumps({k: v.digest for k, v in sorted(files.items())}).encode()).hexdigest()[:16]
    folder = Path(store.scratch()).parent / "models" / key
    if not (folder / ".complete").exists():
        tmp = folder.with_name(f"{key}.tmp-{uuid.uuid4().hex}")
        tmp.mkdir(parents=True)
        for name in files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(paths[name], tmp / name)
        (tmp / ".complete").touch()
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its folder is equivalent
            shutil.rmtree(tmp)
    return ModelDir(folder)


def _manifest(source: str, revision: str, files: dict[str, Blob], store: Store) -> ModelManifest:
    model = dataclasses.replace(materialize(store, files), source=redact(source))
    config = model.config()
    check_against_config(config, model.weights().tensors)
    params = 0
    for name in files:
        if name.endswith(".safetensors"):
            params += sum(t.numel for t in read_safetensors_header(model.path / name).values())
    return ModelManifest(source=redact(source), revision=revision, files=files, model_type=config.model_type,
                         num_layers=int(config.num_hidden_layers), parameters=params)
