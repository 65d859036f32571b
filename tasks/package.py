"""package: publish format files, config, tokenizer, quality report and a model card to the destination.

The whole package, manifest.json (sha256 and size of every file) included, is written into a staging
folder beside the destination, then put in place with one rename (an exchange with the previous
package where there is one), so a reader never sees a package without its manifest, or a mix of two.
Object stores have no folder rename: there the old manifest is removed first, files move, and the new
manifest comes last. Publishing replaces the folder, so one holding files that neither its manifest
lists nor this package replaces is refused.
An output whose packed tensors failed convert's verification is refused before anything is written.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import yaml

from quantfab.tasks.charts import charts
from quantfab.tasks.convert.differences import summary
from quantfab.tasks.redact import redact
from quantfab.tasks.errors import QualityGateFailed, UserError, VerificationFailed
from quantfab.tasks.manifests import (SOURCE_CARD, CalibrationManifest, ConvertManifest, ModelManifest, PackageManifest,
                                      QualityManifest)
from quantfab.tasks.regression import compare_reports, comparison_table, read_report
from quantfab.tasks.store import Blob, Store, file_stamp, filesystem, is_local, reporting_full_disks, sha256_of

STAGING = ".quantfab-staging"
STAGING_NAME = re.compile(r"^\.(?P<dest>.+)\.quantfab-staging-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{32}(-old)?$")
AT_FDCWD, RENAME_EXCHANGE = -100, 2
_LIBC = ctypes.CDLL(None, use_errno=True)
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model")


def package(name: str, model: ModelManifest, converted: ConvertManifest, quality: QualityManifest, recipe_yaml: str,
            recipe_digest: str, destination: str, version: str, store: Store,
            calibration: CalibrationManifest | None = None, max_regression: float | None = None) -> PackageManifest:
    failures = [f"{f.path}: {m.tensor}: {m.count} element(s) differ, first at flat index {m.first_index} "
                f"(max abs error {m.max_abs_error:g})" for f in converted.files.values() for m in f.verification.mismatches]
    if failures:
        raise VerificationFailed(failures)
    report = json.loads(store.read_bytes(quality.report))
    comparison = _refuse_regression(destination, report, max_regression) if max_regression is not None else ""
    files: dict[str, bytes | Blob] = {p: b for f in converted.files.values() for p, b in f.files.items()}
    files.update({n: b for n, b in model.files.items() if n in MODEL_FILES})
    files["quality.json"] = quality.report
    pictures = charts(report)
    files.update(pictures)
    source_card = store.read_bytes(model.files[SOURCE_CARD]).decode("utf-8", "replace") \
        if SOURCE_CARD in model.files else ""
    files["README.md"] = model_card(model, converted, quality, recipe_yaml,
                                    Provenance(recipe_digest, version, calibration, source_card), report,
                                    sorted(pictures)).encode()
    fs, root = filesystem(destination, "package.destination")
    root = root.rstrip("/")
    for path in files:
        _check_relative(path)
    _refuse_foreign(fs, root, destination, set(files))
    parent, base = root.rsplit("/", 1) if "/" in root else ("", root)
    fs.makedirs(parent or ".", exist_ok=True)
    _remove_dead_staging(fs, parent, base)
    staging = f"{parent}/.{base}{STAGING}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    fs.makedirs(staging, exist_ok=True)
    entries = []
    try:
        for path in sorted(files):
            data = files[path]
            if "/" in path:  # a folder output's file
                fs.makedirs(f"{staging}/{path.rsplit('/', 1)[0]}", exist_ok=True)
            if isinstance(data, Blob):
                store.copy_out(data, fs, f"{staging}/{path}")  # hashed as it is copied
                digest, size = data.digest, data.size
            else:
                with reporting_full_disks("package.destination", fs, staging, len(data)):
                    fs.pipe_file(f"{staging}/{path}", data)
                digest, size = hashlib.sha256(data).hexdigest(), len(data)
            entries.append({"path": path, "sha256": digest, "size": size})
        manifest = json.dumps({
            "name": name, "quantfab_version": version, "recipe_digest": recipe_digest,
            "source": redact(model.source), "source_revision": model.revision, "passed": quality.passed,
            "formats": {k: {"path": f.path, "weight_bytes": f.weight_bytes, "bits_per_weight": f.bits_per_weight}
                        for k, f in converted.files.items()},
            "files": entries}, indent=2, sort_keys=True).encode()
        with reporting_full_disks("package.destination", fs, staging, len(manifest)):
            fs.pipe_file(f"{staging}/manifest.json", manifest)
        if is_local(fs):
            _swap_into_place(staging, root)  # staging now holds the previous package, if there was one
        else:
            _move_files(fs, staging, root, [e["path"] for e in entries])
    finally:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
    stamps = {e["path"]: (file_stamp(fs, f"{root}/{e['path']}", identity=False) or (0, ""))[1] for e in entries}
    return PackageManifest(destination=redact(destination), manifest_sha256=hashlib.sha256(manifest).hexdigest(),
                           files=[e["path"] for e in entries], stamps=stamps, comparison=comparison)


def _check_relative(path: str) -> None:
    """A published path stays inside the destination: relative, no '..', no empty or dot parts."""
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise UserError(f"package: refusing to publish {path!r}: a file's path must stay inside the destination "
                        "(relative, without '..')")


def _refuse_foreign(fs, root: str, destination: str, publishing: set[str]) -> None:
    """Publishing replaces the destination folder, so it may hold only an earlier package (what its
    manifest lists) or files this package replaces anyway; anything else is someone's and is refused."""
    try:
        present = {p[len(root) + 1:] for p in fs.find(root)}
    except FileNotFoundError:
        return
    present = {p for p in present if p and not p.startswith(STAGING)}  # an older layout's staging folders
    if not present:
        return
    listed = {"manifest.json", *publishing}
    if "manifest.json" in present:
        try:
            listed |= {f["path"] for f in json.loads(fs.cat_file(f"{root}/manifest.json"))["files"]}
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable manifest vouches for nothing
    foreign = sorted(present - listed)
    if foreign:
        raise UserError(f"{redact(destination)}: holds {len(foreign)} file(s) that no quantfab manifest there lists "
                        f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); publishing replaces the "
                        "whole folder, so choose an empty folder or remove them")


def _swap_into_place(staging: str, root: str) -> None:
    """Put the finished folder at ``root`` in one rename: readers see the old package or the new one.

    A new destination is a plain rename; an existing one is exchanged with renameat2(RENAME_EXCHANGE)
    where the kernel has it, else moved aside first (then, for an instant, there is no folder at all).
    """
    for _ in range(100):  # another run may publish between our attempts
        try:
            os.rename(staging, root)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        exchanged = _exchange(staging, root)
        if exchanged:
            return
        if exchanged is None:  # no RENAME_EXCHANGE here: move the old package aside
            aside = f"{staging}-old"
            try:
                os.rename(root, aside)
            except FileNotFoundError:
                continue
            try:
                os.rename(staging, root)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue  # another run published meanwhile: exchange with theirs next
            finally:
                shutil.rmtree(aside, ignore_errors=True)
            return
    raise OSError(f"{root}: could not publish: the folder kept changing under concurrent runs")


def _exchange(a: str, b: str) -> bool | None:
    """renameat2(a, b, RENAME_EXCHANGE): True when swapped, False when ``b`` vanished, None when unsupported."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return None
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ENOENT:
        return False
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return None
    raise OSError(err, os.strerror(err), b)


def _move_files(fs, staging: str, root: str, paths: list[str]) -> None:
    """Object stores have no folder rename: the old manifest goes first, files move, the new manifest last."""
    if fs.exists(f"{root}/manifest.json"):
        fs.rm(f"{root}/manifest.json")
    for path in paths:
        if "/" in path:
            fs.makedirs(f"{root}/{path.rsplit('/', 1)[0]}", exist_ok=True)
        fs.mv(f"{staging}/{path}", f"{root}/{path}")
    fs.mv(f"{staging}/manifest.json", f"{root}/manifest.json")


def _remove_dead_staging(fs, parent: str, base: str) -> None:
    """Staging folders beside the destination left by a killed package run of this host (its pid is
    gone) are removed; a live run's, or another host's, are left alone."""
    try:
        entries = fs.ls(parent or ".", detail=False)
    except FileNotFoundError:
        return
    for entry in entries:
        found = STAGING_NAME.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if (found and found["dest"] == base and found["host"] == socket.gethostname()
                and not _alive(int(found["pid"]))):
            fs.rm(entry, recursive=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse_regression(destination: str, report: dict, threshold: float) -> str:
    """validate.gates.max_regression: the package published at the destination is the last build; a new one worse
    than it beyond the threshold and the noise is refused, and the old one stays (tasks/regression.py). Returns the
    comparison ("" for the first build), which the flow shows as an artifact."""
    fs, root = filesystem(destination, "package.destination")
    if not fs.exists(f"{root.rstrip('/')}/quality.json"):
        return ""  # the first build
    old = read_report(destination)
    deltas, regressions = compare_reports(old, report, threshold)
    table = comparison_table(old, report, deltas, regressions)
    if regressions:
        raise QualityGateFailed(table, [f"max_regression {threshold} against the package at {redact(destination)}: "
                                        f"{r}" for r in regressions])
    return table


def publication_problem(destination: str, expected: PackageManifest) -> str | None:
    """None when the destination still holds the package this manifest describes, else what changed.

    The cheap check of a cache hit: manifest.json's digest, and each listed file's size and modification
    time as published; a file whose stamp changed is hashed against the manifest.
    """
    fs, root = filesystem(destination, "package.destination")
    root = root.rstrip("/")
    try:
        manifest = fs.cat_file(f"{root}/manifest.json")
    except FileNotFoundError:
        return "manifest.json is missing"
    if hashlib.sha256(manifest).hexdigest() != expected.manifest_sha256:
        return "manifest.json was replaced or altered"
    listed = {f["path"]: f for f in json.loads(manifest)["files"]}
    for path in expected.files:
        found = file_stamp(fs, f"{root}/{path}", identity=False)
        if found is None:
            return f"{path} is missing"
        if found[1] != expected.stamps.get(path) and (
                found[0] != listed[path]["size"] or sha256_of(fs, f"{root}/{path}") != listed[path]["sha256"]):
            return f"{path} no longer matches its sha256 in manifest.json"
    return None


@dataclass(frozen=True)
class Provenance:
    """What the model card says a build came from, so anyone can check it or build it again."""

    recipe_digest: str = ""
    version: str = ""
    calibration: CalibrationManifest | None = None
    source_card: str = ""  # the source model's README.md, for its license


LIBRARIES = {"gguf": "gguf", "mlx": "mlx"}  # format -> the Hub's library_name (the others load in transformers)


def front_matter(model: ModelManifest, recipe_yaml: str, provenance: Provenance) -> dict[str, Any]:
    """The YAML the Hugging Face Hub reads from a quantized model's card: the base model (a Hub id for an hf://
    source), the relation, the library that loads the first output, tags, and the source's license carried over."""
    source = redact(model.source)
    recipe = yaml.safe_load(recipe_yaml) or {}
    formats = [o["format"] for o in recipe.get("outputs") or [] if isinstance(o, dict) and "format" in o]
    card: dict[str, Any] = {
        "base_model": source.removeprefix("hf://") if source.startswith("hf://") else source,
        "base_model_relation": "quantized",
        "quantized_by": "quantfab",
        "library_name": LIBRARIES.get(formats[0], "transformers") if formats else "transformers",
        "tags": ["quantized", "quantfab", *sorted(set(formats))],
    }
    license_ = source_front_matter(provenance.source_card)
    card.update({k: license_[k] for k in ("license", "license_name", "license_link") if k in license_})
    return card


def source_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card (empty where it has none or it does not parse)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        found = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return found if isinstance(found, dict) else {}


def model_card(model: ModelManifest, converted: ConvertManifest, quality: QualityManifest, recipe_yaml: str,
               provenance: Provenance = Provenance(), report: dict[str, Any] | None = None,
               pictures: list[str] | None = None) -> str:
    sizes = "\n".join(f"| {f.path} | {f.weight_bytes:,} | {f.bits_per_weight:.3f} | {f.nominal_bits_per_weight:.3f} | "
                      f"{', '.join(f'{k}×{v}' for k, v in sorted(f.tensor_types.items()))} | "
                      f"{'<br>'.join(summary(f.fallbacks)) or 'none'} |"
                      for f in converted.files.values())
    front = yaml.safe_dump(front_matter(model, recipe_yaml, provenance), sort_keys=False)
    return (f"---\n{front}---\n\n# Quantized build of `{redact(model.source)}`\n\n"
            f"Source revision `{model.revision}`, {model.parameters:,} parameters, built by quantfab.\n\n"
            f"## Quality\n\n{quality.table}\n\n"
            + "".join(f"![{path.removeprefix('charts/').removesuffix('.png')}]({path})\n\n" for path in pictures or [])
            + f"## Files\n\n| file or folder | weight bytes | bits/weight | nominal | tensor types | differences from the recipe "
            f"(tensors × reason) |\n|---|---|---|---|---|---|\n{sizes}\n\n"
            f"{provenance_section(model, provenance, report or {})}"
            f"## Recipe\n\n```yaml\n{recipe_yaml}```\n")


def provenance_section(model: ModelManifest, provenance: Provenance, report: dict[str, Any]) -> str:
    """Where every input came from, by digest, and the command that builds the package again."""
    lines = [f"- Source: `{redact(model.source)}` at revision `{model.revision}`"]
    if provenance.recipe_digest:
        lines.append(f"- Recipe (below): sha256 `{provenance.recipe_digest}`")
    cal = provenance.calibration
    if cal is not None:
        lines.append(f"- Calibration: {cal.count:,} tokens from `{cal.source or 'the recipe calibration.source'}`, "
                     f"token file sha256 `{cal.tokens.digest}`")
    protocol = report.get("protocol", {})
    if "tokens_sha256" in protocol:
        lines.append(f"- Evaluation: {protocol['tokens']:,} scored tokens ({protocol['windows']} windows of "
                     f"{protocol['window']}), token ids sha256 `{protocol['tokens_sha256']}`")
    for name, task in report.get("tasks", {}).items():
        lines.append(f"- Task eval {name}: {task['items']} {task['kind']} items from `{task['source']}`, sha256 "
                     f"`{task['sha256']}`")
    if provenance.version:
        pin = f" --set model.revision={model.revision}" if model.source.startswith("hf://") and model.revision else ""
        lines.append(f"- Built by quantfab {provenance.version}. To build it again: save the recipe below as "
                     f"`recipe.yaml` (its redacted URLs filled in) and run `quantfab run recipe.yaml{pin}` with "
                     f"quantfab {provenance.version}")
    return "## Provenance\n\n" + "\n".join(lines) + "\n\n"
