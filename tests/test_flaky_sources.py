"""Download from a flaky HTTP source on 127.0.0.1: dropped bodies, 5xx, truncation, wrong bytes.

The server serves a synthetic model folder (index page, HEAD, Range requests) and plays a script of
faults per file, one per GET. The download stage's function runs against it for real: it must retry
with backoff, resume a dropped body with a ranged request, check size and the pinned sha256, and fail
with a message naming the file after its attempts, leaving no partial or wrong file in the store.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path
from typing import Iterator

import pytest

from quantfab.tasks import download as download_mod
from quantfab.tasks import synthetic
from quantfab.tasks.errors import UserError
from quantfab.tasks.store import Store

WEIGHTS = "model-00002-of-00004.safetensors"  # 148,888 bytes: three 64 KiB ranged reads
INCLUDE = ["*.safetensors", "config.json"]


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    faults: dict[str, list[str]]  # file name -> what the next GETs do: drop | 500 | 503 | truncate | wrong | ok
    seen: list[tuple[str, str | None, str]]  # (file, Range header, fault played)

    def do_GET(self) -> None:
        name = Path(self.path).name
        script = self.faults.get(name)
        fault = script.pop(0) if script else "ok"
        self.seen.append((name, self.headers.get("Range"), fault))
        path = Path(self.translate_path(self.path))
        if path.is_dir() or fault == "ok" and not self.headers.get("Range"):
            return super().do_GET()
        if fault in ("500", "503"):
            self.send_error(int(fault))
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        if self.headers.get("Range"):
            first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        body = bytearray(data[start:end + 1])
        if fault == "wrong" and body:
            body[len(body) // 2] ^= 0xFF  # same length, different bytes
        self.send_response(206 if self.headers.get("Range") else 200)
        if self.headers.get("Range"):
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if fault in ("drop", "truncate"):  # promise the whole body, send part of it, hang up
            self.wfile.write(bytes(body[: len(body) // (3 if fault == "drop" else 2)]))
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(bytes(body))

    def do_HEAD(self) -> None:
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            return super().do_HEAD()
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, type[FlakyHandler], Path]]:
    root = tmp_path / "served"
    synthetic.write_model("synthetic://llama?layers=2&hidden=64&intermediate=128&heads=2&kv_heads=1&vocab=512&seed=4",
                          root / "model")
    handler = type("Handler", (FlakyHandler,), {"faults": {}, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("QUANTFAB_RETRY_SECONDS", "0.01")
    monkeypatch.setattr(download_mod, "CHUNK", 64 << 10)  # several ranged reads per weight file
    yield f"http://127.0.0.1:{server.server_address[1]}/model/", handler, root / "model"
    server.shutdown()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_partial_files(store: Path) -> bool:
    return not [p for p in store.rglob("*") if p.is_file() and p.name.endswith(".part")]


def test_a_dropped_body_resumes_with_a_range_request(source, tmp_path: Path) -> None:
    url, handler, folder = source
    handler.faults[WEIGHTS] = ["ok", "drop", "ok"]  # the second ranged read hangs up a third of the way
    model = download_mod.download(url, None, INCLUDE, False, Store(str(tmp_path / "store")))
    assert model.files[WEIGHTS].digest == sha(folder / WEIGHTS)
    reads = [(r, f) for name, r, f in handler.seen if name == WEIGHTS]
    dropped_at = reads.index((reads[1][0], "drop"))
    resumed = reads[dropped_at + 1][0]
    assert resumed is not None and int(resumed.removeprefix("bytes=").split("-")[0]) >= 64 << 10  # not from 0


def test_server_errors_are_retried(source, tmp_path: Path) -> None:
    url, handler, folder = source
    handler.faults["config.json"] = ["503", "500", "ok"]
    model = download_mod.download(url, None, INCLUDE, False, Store(str(tmp_path / "store")))
    assert model.files["config.json"].digest == sha(folder / "config.json")
    assert [f for name, _, f in handler.seen if name == "config.json"][:3] == ["503", "500", "ok"]


def test_wrong_bytes_are_fetched_again_then_refused_against_the_pin(source, tmp_path: Path) -> None:
    url, handler, folder = source
    pin = {WEIGHTS: sha(folder / WEIGHTS)}
    handler.faults[WEIGHTS] = ["wrong"]
    model = download_mod.download(url, None, INCLUDE, False, Store(str(tmp_path / "once")), pin)
    assert model.files[WEIGHTS].digest == pin[WEIGHTS]  # the bad copy was thrown away and fetched again
    handler.faults[WEIGHTS] = ["wrong"] * 100
    store = tmp_path / "always"
    with pytest.raises(UserError, match=rf"{WEIGHTS}: download failed after 4 attempts: sha256 differs"):
        download_mod.download(url, None, INCLUDE, False, Store(str(store)), pin)
    blobs = [p for p in (store / "blobs").rglob("*") if p.is_file()] if (store / "blobs").exists() else []
    assert all(sha(p) != hashlib.sha256(b"").hexdigest() for p in blobs) and no_partial_files(store)
    assert all(p.stat().st_size != (folder / WEIGHTS).stat().st_size for p in blobs)  # no copy of the weights


def test_a_source_that_always_truncates_fails_clearly_and_leaves_nothing(source, tmp_path: Path) -> None:
    url, handler, folder = source
    handler.faults[WEIGHTS] = ["truncate"] * 100
    store = tmp_path / "store"
    with pytest.raises(UserError, match=rf"model/{WEIGHTS}: download failed after 4 attempts"):
        download_mod.download(url, None, INCLUDE, False, Store(str(store)))
    assert no_partial_files(store)
    sizes = {p.stat().st_size for p in (store / "blobs").rglob("*") if p.is_file()} if (store / "blobs").exists() else set()
    assert (folder / WEIGHTS).stat().st_size not in sizes


def test_a_pin_for_a_file_the_source_does_not_have_is_refused(source, tmp_path: Path) -> None:
    url, _, _ = source
    with pytest.raises(UserError, match="model.sha256 pins nope.safetensors"):
        download_mod.download(url, None, INCLUDE, False, Store(str(tmp_path / "s")), {"nope.safetensors": "0" * 64})
