"""Nothing leaves the store unverified, `quantfab verify`, locks, and failing writes (issue #24).

Store-level faults on real files: a byte altered by a write (the stamp changes: the cheap check of a
cache hit hashes it again), a byte altered under an unchanged stamp (bit rot: only the whole hash of a
read or a copy sees it), a truncated and a missing blob. A damaged blob is moved aside, never deleted.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from quantfab.pipelines.cli import main
from quantfab.tasks.locks import stage_lock
from quantfab.tasks.store import BlobUnavailable, Store, WriteFailed
from quantfab.tasks.verify import verify_package, verify_store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def put(store: Store, tmp_path: Path, data: bytes) -> tuple:
    src = tmp_path / f"src-{uuid.uuid4().hex}"
    src.write_bytes(data)
    return store.put_file(src), data


def quarantined(store: Store) -> dict[str, bytes]:
    folder = Path(store.root) / "quarantine"
    return {p.name.split(".")[0]: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


def test_an_intact_blob_passes_both_checks(store: Store, tmp_path: Path) -> None:
    blob, data = put(store, tmp_path, os.urandom(1 << 16))
    assert store.check(blob) is None and store.check(blob, whole=True) is None
    assert store.local_path(blob).read_bytes() == data


def test_a_written_byte_is_caught_by_the_cheap_check_and_moved_aside(store: Store, tmp_path: Path, damage) -> None:
    blob, data = put(store, tmp_path, os.urandom(1 << 16))
    damage.flip(Path(store._key(blob.digest)))
    problem = store.check(blob)
    assert problem.startswith("altered: its 65,536 bytes now hash to sha256 ") and "moved aside to" in problem
    assert not Path(store._key(blob.digest)).exists()
    altered = bytearray(data)
    altered[len(data) // 2] ^= 1
    assert quarantined(store) == {blob.digest: bytes(altered)}  # kept, not deleted
    assert store.check(blob) == "missing from the store"


def test_bit_rot_passes_the_cheap_check_but_not_a_read(store: Store, tmp_path: Path, damage) -> None:
    blob, _ = put(store, tmp_path, os.urandom(1 << 16))
    damage.rot(store, blob.digest)
    damage.forget_hashes()
    assert store.check(blob) is None  # size and stamp as recorded
    with pytest.raises(BlobUnavailable) as exc:
        store.local_path(blob)
    assert exc.value.digest == blob.digest and "altered" in exc.value.problem
    assert blob.digest in quarantined(store)


def test_truncated_and_missing_blobs(store: Store, tmp_path: Path) -> None:
    blob, _ = put(store, tmp_path, os.urandom(1000))
    os.truncate(store._key(blob.digest), 600)
    assert store.check(blob).startswith("truncated to 600 bytes (written as 1,000)")
    with pytest.raises(BlobUnavailable, match="missing from the store"):
        store.local_path(blob)
    again, _ = put(store, tmp_path, os.urandom(10))
    os.unlink(store._key(again.digest))
    assert store.get_ref("k", "nothing") is None
    store.put_ref("k", "x", again)
    assert store.get_ref("k", "x") is None  # a name whose bytes left the store names nothing


def test_putting_good_bytes_again_heals_a_damaged_blob(store: Store, tmp_path: Path, damage) -> None:
    blob, data = put(store, tmp_path, os.urandom(4096))
    damage.flip(Path(store._key(blob.digest)))
    assert put(store, tmp_path, data)[0] == blob
    assert Path(store._key(blob.digest)).read_bytes() == data and store.check(blob, whole=True) is None


def test_a_copy_out_of_a_rotten_blob_leaves_nothing_at_the_destination(store: Store, tmp_path: Path, damage) -> None:
    blob, _ = put(store, tmp_path, os.urandom(1 << 20))
    damage.rot(store, blob.digest)
    dest = tmp_path / "dest.bin"
    with pytest.raises(BlobUnavailable):
        store.copy_out(blob, fsspec.filesystem("file"), str(dest))
    assert not dest.exists()


def test_a_full_disk_while_adding_a_blob_leaves_the_store_as_it_was(store: Store, tmp_path: Path, monkeypatch) -> None:
    kept, _ = put(store, tmp_path, b"kept")
    before = sorted(p.relative_to(store.root) for p in Path(store.root).rglob("*") if p.is_file())

    def full(src: str, dst: str, **_: object) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[:10])  # a partial copy, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store.fs, "put_file", full)
    src = tmp_path / "big"
    src.write_bytes(os.urandom(3 << 20))
    with pytest.raises(WriteFailed, match=r"the store \(.*\): write failed: no space left, 3\.0 MiB needed; [\d,.]+ MiB free"):
        store.put_file(src)
    after = sorted(p.relative_to(store.root) for p in Path(store.root).rglob("*") if p.is_file())
    assert after == before and store.check(kept, whole=True) is None


def package(folder: Path, files: dict[str, bytes]) -> Path:
    import hashlib

    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    entries = [{"path": n, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()]
    (folder / "manifest.json").write_text(json.dumps({"files": entries}))
    return folder


def test_verify_a_package(tmp_path: Path, capsys, damage) -> None:
    good = package(tmp_path / "good", {"a.gguf": os.urandom(5000), "config.json": b"{}"})
    assert [(c.path, c.status) for c in verify_package(str(good))] == [("a.gguf", "ok"), ("config.json", "ok")]
    assert main(["verify", str(good)]) == 0
    bad = package(tmp_path / "bad", {"a.gguf": os.urandom(5000), "b.gguf": b"b", "config.json": b"{}"})
    damage.flip(bad / "a.gguf")
    (bad / "b.gguf").unlink()
    (bad / "stray.txt").write_text("x")
    checks = verify_package(f"file://{bad}")
    assert [(c.path, c.status) for c in checks] == [("a.gguf", "altered"), ("b.gguf", "missing"), ("config.json", "ok"),
                                                   ("stray.txt", "extra")]
    assert "the manifest lists" in checks[0].detail
    capsys.readouterr()
    assert main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out] == [["altered", "a.gguf"], ["missing", "b.gguf"], ["ok", "config.json"],
                                                  ["extra", "stray.txt"]]
    assert main(["verify", str(tmp_path / "nothing-here")]) == 2  # not a package: said, no traceback


def test_verify_a_store(store: Store, tmp_path: Path, damage) -> None:
    blobs = [put(store, tmp_path, os.urandom(100 + i))[0] for i in range(3)]
    damage.rot(store, blobs[1].digest)
    damage.forget_hashes()
    leftover = Path(store._key(blobs[0].digest) + ".tmp-0123")
    leftover.write_bytes(b"partial")
    checks = {c.path.replace("/", "")[len("blobssha256"):]: c.status for c in verify_store(store)}
    assert checks == {blobs[0].digest: "ok", blobs[1].digest: "altered", blobs[2].digest: "ok",
                      blobs[0].digest + ".tmp-0123": "extra"}
    assert blobs[1].digest in quarantined(store)
    assert main(["verify", "--store", store.url]) == 1  # the leftover
    leftover.unlink()
    assert main(["verify", "--store", store.url]) == 0  # the altered blob is out of the way now


# Locks: the flock of a local store, and the lease of an object store (memory:// here, shared by threads).

HOLD = """
import sys, time
from quantfab.tasks.locks import stage_lock
from quantfab.tasks.store import Store
with stage_lock(Store(sys.argv[1]), "convert-k"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_leaves_no_lock_behind(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    heard: list[str] = []
    waiter = threading.Thread(target=lambda: stage_lock(Store(str(tmp_path)), "convert-k", heard.append).__enter__())
    waiter.start()
    waiter.join(2)
    assert waiter.is_alive() and heard == [f"pid {holder.pid} on {socket.gethostname()}"]  # it waits for a live holder
    os.kill(holder.pid, signal.SIGKILL)  # no chance to release anything
    holder.wait()
    waiter.join(30)
    assert not waiter.is_alive()  # and gets the lock as soon as the holder is gone


def memory_store() -> Store:
    return Store(f"memory://locks-{uuid.uuid4().hex}")


def test_a_lease_admits_one_holder_at_a_time() -> None:
    store, inside, most = memory_store(), [], []

    def work() -> None:
        with stage_lock(store, "quantize-k"):
            inside.append(1)
            most.append(len(inside))
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(most) == 4 and max(most) == 1
    assert not store.fs.exists(f"{store.root}/locks/quantize-k.lease")  # released


@pytest.mark.parametrize("owner, takes_over", [
    ({"host": socket.gethostname(), "pid": 2**22 + 12345, "beat": time.time()}, True),  # a dead process of this host
    ({"host": "elsewhere", "pid": 1, "beat": time.time() - 3600}, True),  # nobody renewed it for an hour
    ({"host": "elsewhere", "pid": 1, "beat": time.time() + 3600}, False),  # renewed: its owner is alive
])
def test_a_stale_lease_is_taken_over_and_a_live_one_waited_for(owner: dict, takes_over: bool) -> None:
    store = memory_store()
    path = f"{store.root}/locks/validate-k.lease"
    store.fs.makedirs(os.path.dirname(path), exist_ok=True)
    store.fs.pipe_file(path, json.dumps(owner).encode())
    got = threading.Event()
    heard: list[str] = []

    def take() -> None:
        with stage_lock(store, "validate-k", heard.append):
            got.set()

    threading.Thread(target=take, daemon=True).start()
    assert got.wait(3) == takes_over
    assert heard == ([] if takes_over else ["pid 1 on elsewhere"])
    if not takes_over:  # (a taker releases its own lease as it leaves: nothing to remove then)
        store.fs.rm(path)  # its owner releases it: the waiter gets it
        assert got.wait(10)
