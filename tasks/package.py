"""package: publish format files, config, tokenizer, quality report and a model card to the destination.

Everything is first written under a staging prefix inside the destination, then moved into place;
manifest.json (sha256 and size of every file) is written last, and an older manifest is removed first,
so a reader that trusts manifest.json never sees a half-published package. An output whose packed
tensors failed convert's verification is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import uuid
import fsspec

from quantfab.tasks.redact import redact
from quantfab.tasks.errors import VerificationFailed
from quantfab.tasks.manifests import ConvertManifest, ModelManifest, PackageManifest, QualityManifest
from quantfab.tasks.store import Blob, Store

STAGING = ".quantfab-staging"
STAGING_NAME = re.compile(r"^\.quantfab-staging-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{32}$")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model")


def package(name: str, model: ModelManifest, converted: ConvertManifest, quality: QualityManifest, recipe_yaml: str,
            recipe_digest: str, destination: str, version: str, store: Store) -> PackageManifest:
    failures = [f"{f.path}: {m.tensor}: {m.count} element(s) differ, first at flat index {m.first_index} "
                f"(max abs error {m.max_abs_error:g})" for f in converted.files.values() for m in f.verification.mismatches]
    if failures:
        raise VerificationFailed(failures)
    files: dict[str, bytes | Blob] = {p: b for f in converted.files.values() for p, b in f.files.items()}
    files.update({n: b for n, b in model.files.items() if n in MODEL_FILES})
    files["quality.json"] = quality.report
    files["README.md"] = model_card(model, converted, quality, recipe_yaml).encode()
    fs, root = fsspec.core.url_to_fs(destination)
    _remove_dead_staging(fs, root)
    staging = f"{root}/{STAGING}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    fs.makedirs(staging, exist_ok=True)
    entries = []
    try:
        for path in sorted(files):
            data = files[path]
            if "/" in path:  # a folder output's file
                fs.makedirs(f"{staging}/{path.rsplit('/', 1)[0]}", exist_ok=True)
            if isinstance(data, Blob):
                fs.put_file(str(store.local_path(data)), f"{staging}/{path}")
                digest, size = data.digest, data.size
            else:
                fs.pipe_file(f"{staging}/{path}", data)
                digest, size = hashlib.sha256(data).hexdigest(), len(data)
            entries.append({"path": path, "sha256": digest, "size": size})
        manifest = json.dumps({
            "name": name, "quantfab_version": version, "recipe_digest": recipe_digest,
            "source": redact(model.source), "source_revision": model.revision, "passed": quality.passed,
            "formats": {k: {"path": f.path, "weight_bytes": f.weight_bytes, "bits_per_weight": f.bits_per_weight}
                        for k, f in converted.files.items()},
            "files": entries}, indent=2, sort_keys=True).encode()
        if fs.exists(f"{root}/manifest.json"):
            fs.rm(f"{root}/manifest.json")
        for e in entries:
            if "/" in e["path"]:
                fs.makedirs(f"{root}/{e['path'].rsplit('/', 1)[0]}", exist_ok=True)
            fs.mv(f"{staging}/{e['path']}", f"{root}/{e['path']}")
        fs.pipe_file(f"{staging}/manifest.json", manifest)
        fs.mv(f"{staging}/manifest.json", f"{root}/manifest.json")
    finally:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
    return PackageManifest(destination=redact(destination), manifest_sha256=hashlib.sha256(manifest).hexdigest(),
                           files=[e["path"] for e in entries])


def _remove_dead_staging(fs, root: str) -> None:
    """Staging folders left by a killed package run of this host (its pid is gone) are removed; a live
    run's, or another host's, are left alone."""
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return
    for entry in entries:
        found = STAGING_NAME.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if found and found["host"] == socket.gethostname() and not _alive(int(found["pid"])):
            fs.rm(entry, recursive=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def published(destination: str, expected: PackageManifest) -> bool:
    """Whether the destination still holds the package this manifest describes."""
    fs, root = fsspec.core.url_to_fs(destination)
    try:
        return hashlib.sha256(fs.cat_file(f"{root}/manifest.json")).hexdigest() == expected.manifest_sha256
    except FileNotFoundError:
        return False


def model_card(model: ModelManifest, converted: ConvertManifest, quality: QualityManifest, recipe_yaml: str) -> str:
    sizes = "\n".join(f"| {f.path} | {f.weight_bytes:,} | {f.bits_per_weight:.3f} | "
                      f"{', '.join(f'{k}×{v}' for k, v in sorted(f.tensor_types.items()))} |"
                      for f in converted.files.values())
    return (f"# Quantized build of `{redact(model.source)}`\n\n"
            f"Source revision `{model.revision}`, {model.parameters:,} parameters, built by quantfab.\n\n"
            f"## Quality\n\n{quality.table}\n\n"
            f"## Files\n\n| file or folder | weight bytes | bits/weight | tensor types |\n|---|---|---|---|\n{sizes}\n\n"
            f"## Recipe\n\n```yaml\n{recipe_yaml}```\n")

