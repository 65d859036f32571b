"""One writer per stage result: runs sharing a store compute each stage once, the others wait and then
find it cached.

A lock is named by the stage's cache key. On a local store it is an flock on ``locks/<name>.lock``: the
kernel drops it when its process dies, however it dies, so a killed run never leaves one behind. Object
stores have no flock: there a lock is a lease object created only if absent (``open(mode="xb")``, a
conditional PUT on S3, GCS and Azure) whose owner rewrites it every few seconds; a lease whose owner is a
dead process of this host, or that nobody has renewed for ``QUANTFAB_LEASE_SECONDS`` (60), is taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from quantfab.tasks.store import Store

POLL_SECONDS = 0.5


def _owner() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "beat": time.time()}


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}"


@contextmanager
def stage_lock(store: Store, name: str, on_wait: Callable[[str], None] = lambda _: None) -> Iterator[None]:
    """Hold the lock ``name`` in ``store`` for the block; ``on_wait`` hears whom we wait for, once."""
    with (_flock if store.is_local else _lease)(store, name, on_wait):
        yield


@contextmanager
def _flock(store: Store, name: str, on_wait: Callable[[str], None]) -> Iterator[None]:
    path = f"{store.root}/locks/{name}.lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = _describe(json.loads(os.pread(fd, 4096, 0) or b"{}"))
            except ValueError:
                holder = "another run"
            on_wait(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)  # whom a waiter is waiting for
        yield
    finally:
        os.close(fd)  # releases the flock


def lease_seconds() -> float:
    return float(os.environ.get("QUANTFAB_LEASE_SECONDS", "60"))


def _stale(owner: dict) -> bool:
    """A lease of a dead process of this host, or one nobody renewed for lease_seconds()."""
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            pass
    return time.time() - float(owner.get("beat", 0)) > lease_seconds()


@contextmanager
def _lease(store: Store, name: str, on_wait: Callable[[str], None]) -> Iterator[None]:
    fs, path = store.fs, f"{store.root}/locks/{name}.lease"
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    me = {**_owner(), "token": uuid.uuid4().hex}
    told = False
    while True:
        try:
            with fs.open(path, "xb") as f:
                f.write(json.dumps(me).encode())
            break
        except FileExistsError:
            pass
        owner = _lease_owner(fs, path)
        if owner is None:
            continue  # released meanwhile
        if _stale(owner):
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass
            continue
        if not told:
            on_wait(_describe(owner))
            told = True
        time.sleep(POLL_SECONDS)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_seconds() / 4):
            fs.pipe_file(path, json.dumps({**me, "beat": time.time()}).encode())

    beat = threading.Thread(target=renew, daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        try:
            if json.loads(fs.cat_file(path)).get("token") == me["token"]:
                fs.rm(path)
        except (FileNotFoundError, ValueError):
            pass


def held(store: Store, name: str) -> bool:
    """Whether some process holds the lock ``name`` now (a live run holds its build's lock to its end)."""
    if store.is_local:
        path = f"{store.root}/locks/{name}.lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    owner = _lease_owner(store.fs, f"{store.root}/locks/{name}.lease")
    return owner is not None and not _stale(owner)


def _lease_owner(fs: Any, path: str) -> dict | None:
    """Who holds the lease at ``path`` (``{}`` for a torn or foreign one: stale once old enough); None when free."""
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
