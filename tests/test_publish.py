"""package publishes atomically: a reader polling the destination while packages replace each other
never sees files without the manifest that lists them, nor a mix of two packages; paths cannot leave
the destination; a folder holding files quantfab did not write is refused, not overwritten."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from quantfab.tasks.errors import UserError
from quantfab.tasks.manifests import ConvertManifest, FormatFile, ModelManifest, QualityManifest, Verification
from quantfab.tasks import package as package_module
from quantfab.tasks.package import package
from quantfab.tasks.store import Store

FILES = 12  # files per package, so that moving them one by one would be seen


def build(store: Store, n: int, extra: dict[str, bytes] | None = None) -> tuple[ModelManifest, ConvertManifest, QualityManifest]:
    """Package inputs whose every file differs with ``n``."""
    blobs = {f"part-{i:02d}.gguf": store.put_bytes(f"package {n} file {i}".encode() * 1000) for i in range(FILES)}
    blobs.update({k: store.put_bytes(v) for k, v in (extra or {}).items()})
    verification = Verification(backend="numpy", tensors=0, elements=0, max_abs_error=0.0, mismatches=[])
    fmt = FormatFile(output="gguf-Q8_0", path="part-00.gguf", files=blobs, tensor_types={}, fallbacks=[],
                     bits_per_weight=8.0, nominal_bits_per_weight=8.0, verification=verification)
    model = ModelManifest(source="synthetic://llama", revision=f"r{n}", files={}, model_type="llama", num_layers=1,
                          parameters=1)
    quality = QualityManifest(report=store.put_bytes(b"{}"), passed=True, table="", failures=[])
    return model, ConvertManifest(files={"gguf-Q8_0": fmt}), quality


def publish(store: Store, dest: Path | str, n: int, extra: dict[str, bytes] | None = None) -> None:
    model, converted, quality = build(store, n, extra)
    package(f"pkg-{n}", model, converted, quality, "name: x\n", "digest", str(dest), "0", store)


def snapshot(dest: Path) -> dict[str, bytes] | None:
    """The destination's files, read through one directory handle; None if it was replaced meanwhile."""
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return {}
    try:
        names = os.listdir(fd)
        files = {}
        for name in names:
            if not stat.S_ISREG(os.stat(name, dir_fd=fd).st_mode):
                continue  # a folder (the old layout's staging folder): not a published file
            with open(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as f:
                files[name] = f.read()
        still = os.stat(dest).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return None  # the folder we hold was swapped out and is being removed
    finally:
        os.close(fd)
    return files if still else None


def whole(files: dict[str, bytes]) -> bool:
    """Empty (nothing published yet), or a manifest listing exactly the other files, with their sha256."""
    if not files:
        return True
    if "manifest.json" not in files:
        return False
    listed = {f["path"]: f["sha256"] for f in json.loads(files["manifest.json"])["files"]}
    return listed == {k: hashlib.sha256(v).hexdigest() for k, v in files.items() if k != "manifest.json"}


@pytest.mark.parametrize("exchange", ["renameat2", "rename aside"])
def test_a_reader_never_sees_a_partial_or_mixed_package(tmp_path: Path, monkeypatch, exchange: str) -> None:
    """With RENAME_EXCHANGE the folder is swapped whole; without it (other kernels, other systems) the old
    package is renamed aside first, so for an instant there is no folder, which is not a partial package."""
    if exchange == "rename aside":
        monkeypatch.setattr(package_module, "_exchange", lambda a, b: None)
    store, dest = Store(str(tmp_path / "store")), tmp_path / "out" / "pkg"
    stop, seen, bad = threading.Event(), [], []

    def reader() -> None:
        while not stop.is_set():
            files = snapshot(dest)
            if files is None:
                continue
            seen.append(len(files))
            if not whole(files):
                bad.append(sorted(files))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(15):
            publish(store, dest, n)
    finally:
        stop.set()
        thread.join()
    assert not bad, f"a reader saw {len(bad)} partial package(s), e.g. {bad[0]}"
    assert sum(1 for s in seen if s) > 15  # the reader did look at published packages
    assert json.loads((dest / "manifest.json").read_text())["name"] == "pkg-14"
    assert whole(snapshot(dest) or {})
    assert sorted(p.name for p in dest.parent.iterdir()) == ["pkg"]  # no staging or old package left beside it


def test_the_old_publish_order_would_be_caught(tmp_path: Path) -> None:
    """The check above fails on what it guards against: files without a manifest, or one that lists others."""
    assert not whole({"a.gguf": b"x"})
    listing = json.dumps({"files": [{"path": "a.gguf", "sha256": hashlib.sha256(b"x").hexdigest()}]}).encode()
    assert whole({"a.gguf": b"x", "manifest.json": listing})
    assert not whole({"a.gguf": b"y", "manifest.json": listing})


def test_a_folder_with_files_of_someone_else_is_refused_untouched(tmp_path: Path) -> None:
    store, dest = Store(str(tmp_path / "store")), tmp_path / "out"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds 1 file\(s\) that no quantfab manifest there lists \(notes.txt\)"):
        publish(store, dest, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "store"]
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]

    (dest / "part-03.gguf").write_text("a file the package replaces anyway")  # not a reason to refuse
    with pytest.raises(UserError, match=r"holds 1 file\(s\)"):
        publish(store, dest, 0)
    (dest / "notes.txt").unlink()
    publish(store, dest, 0)
    assert whole(snapshot(dest) or {})

    publish(store, tmp_path / "fresh", 1)  # an earlier package is replaced, however, and a file added to it kept safe
    (tmp_path / "fresh" / "extra.bin").write_bytes(b"added by hand")
    with pytest.raises(UserError, match=r"\(extra.bin\)"):
        publish(store, tmp_path / "fresh", 2)
    assert json.loads((tmp_path / "fresh" / "manifest.json").read_text())["name"] == "pkg-1"


@pytest.mark.parametrize("path", ["../escaped.gguf", "/etc/escaped", "a/../../escaped", "a//b", "./a"])
def test_paths_that_leave_the_destination_are_refused(tmp_path: Path, path: str) -> None:
    store = Store(str(tmp_path / "store"))
    with pytest.raises(UserError, match="must stay inside the destination"):
        publish(store, tmp_path / "out" / "pkg", 0, extra={path: b"x"})
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped.gguf").exists()


def test_object_stores_publish_the_manifest_last(tmp_path: Path) -> None:
    """memory:// has no folder rename: files move one by one and the manifest comes last."""
    import fsspec

    store = Store(str(tmp_path / "store"))
    dest = f"memory://quantfab-test-{os.getpid()}/pkg"
    publish(store, dest, 0)
    publish(store, dest, 1)
    fs = fsspec.filesystem("memory")
    root = dest.removeprefix("memory://")
    files = {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.find(f"/{root}")}
    assert whole(files) and json.loads(files["manifest.json"])["name"] == "pkg-1"
    assert not [p for p in fs.ls(f"/{root.rsplit('/', 1)[0]}", detail=False) if "staging" in p]


def test_staging_folders_of_dead_runs_beside_the_destination_are_removed(tmp_path: Path) -> None:
    """Named .<destination>.quantfab-staging-<host>-<pid>-<uuid>: this host's with a dead pid go, others stay."""
    import socket

    store, dest = Store(str(tmp_path / "store")), tmp_path / "out" / "pkg"
    dead = _exited_pid()
    host = socket.gethostname()
    names = {"dead": f".pkg.quantfab-staging-{host}-{dead}-{'a' * 32}", "live": f".pkg.quantfab-staging-{host}-{os.getpid()}-{'b' * 32}",
             "other host": f".pkg.quantfab-staging-elsewhere-{dead}-{'c' * 32}", "other package": f".other.quantfab-staging-{host}-{dead}-{'d' * 32}"}
    for name in names.values():
        (dest.parent / name).mkdir(parents=True)
    publish(store, dest, 0)
    left = {p.name for p in dest.parent.iterdir()}
    assert left == {"pkg", names["live"], names["other host"], names["other package"]}


def _exited_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
