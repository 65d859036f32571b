"""Credentials never reach what a build writes or prints.

A model is served over HTTP on 127.0.0.1 behind basic auth; the recipe names it as
`http://reader:${QF_TEST_PASSWORD}@127.0.0.1:PORT/model`, so the password is only in the environment,
and HF_TOKEN holds a second secret. A real `quantfab run` subprocess builds it; then every file under the
store, the package, the Prefect home (its database included) and the run's captured output is searched
for both secrets.
"""

from __future__ import annotations

import base64
import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from quantfab.tasks import synthetic

PASSWORD = "pw-7f3a9c1e-do-not-leak"
TOKEN = "hf_tok_52b1d0-do-not-leak"
RECIPE = """\
name: secret-source
model:
  source: http://reader:${{QF_TEST_PASSWORD}}@127.0.0.1:{port}/model
calibration: {{source: "synthetic://tokens?seed=1", samples: 4, seq_len: 64}}
quantize: {{method: rtn}}
outputs: [{{gguf: Q8_0}}]
validate: {{source: "synthetic://tokens?seed=2", tokens: 1024, window: 64, gates: {{max_kl: 1.0, min_top1: 0.0}}}}
package: {{destination: {out}}}
"""


class AuthHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder only to requests carrying reader:PASSWORD."""

    def do_GET(self) -> None:
        expected = "Basic " + base64.b64encode(f"reader:{PASSWORD}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="model"')
            self.end_headers()
            return
        super().do_GET()

    def do_HEAD(self) -> None:
        self.do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served_model(tmp_path: Path) -> Iterator[int]:
    root = tmp_path / "served"
    synthetic.write_model("synthetic://llama?layers=2&hidden=64&intermediate=128&heads=2&kv_heads=1&vocab=512&seed=3",
                          root / "model")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(AuthHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.slow
def test_no_secret_in_any_written_file_or_output(tmp_path: Path, served_model: int) -> None:
    recipe = tmp_path / "secret.yaml"
    recipe.write_text(RECIPE.format(port=served_model, out=tmp_path / "out"))
    env = {**os.environ, "QF_TEST_PASSWORD": PASSWORD, "HF_TOKEN": TOKEN, "PREFECT_HOME": str(tmp_path / "home"),
           "QUANTFAB_STORE": str(tmp_path / "store")}
    done = subprocess.run([str(Path(sys.executable).parent / "quantfab"), "run", str(recipe), "-v"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()
    searched = 0
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink() and "served" not in path.parts:
            data = path.read_bytes()
            searched += 1
            for secret in (PASSWORD, TOKEN):
                assert secret.encode() not in data, f"{secret} leaked into {path}"
    assert searched > 20  # the store's blobs and results, the package, Prefect's database
    for secret in (PASSWORD, TOKEN):
        assert secret not in done.stdout + done.stderr
    assert "reader:" not in (tmp_path / "out" / "manifest.json").read_text()


def test_credentials_in_a_set_override_are_refused_before_prefect_stores_them(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    from quantfab.pipelines.cli import main

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"
    for value in (f"http://reader:{PASSWORD}@127.0.0.1:1/model", f"https://host/model?token={TOKEN}"):
        assert main(["plan", str(recipe), "--set", f"model.source={value}", "--store", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "carries credentials" in err and PASSWORD not in err and TOKEN not in err


@pytest.mark.slow
def test_no_secret_in_plan_output_or_in_the_text_of_a_failure(tmp_path: Path, served_model: int) -> None:
    """`quantfab plan` prints the source; a run whose source is wrong fails with a message naming it; the
    Prefect database records that failure. None of them holds either secret."""
    env = {**os.environ, "QF_TEST_PASSWORD": PASSWORD, "HF_TOKEN": TOKEN, "PREFECT_HOME": str(tmp_path / "home"),
           "QUANTFAB_STORE": str(tmp_path / "store")}
    quantfab = str(Path(sys.executable).parent / "quantfab")
    good, wrong = tmp_path / "good.yaml", tmp_path / "wrong.yaml"
    good.write_text(RECIPE.format(port=served_model, out=tmp_path / "out"))
    wrong.write_text(RECIPE.format(port=served_model, out=tmp_path / "out").replace("/model\n", "/no-such-model\n"))
    planned = subprocess.run([quantfab, "plan", str(good)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert planned.returncode == 0 and "127.0.0.1" in planned.stdout, planned.stdout + planned.stderr
    failed = subprocess.run([quantfab, "run", str(wrong), "-v"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert failed.returncode == 2 and "no-such-model" in failed.stderr, failed.stdout + failed.stderr
    for secret in (PASSWORD, TOKEN):
        assert secret not in planned.stdout + planned.stderr + failed.stdout + failed.stderr
        for path in tmp_path.rglob("*"):
            if path.is_file() and not path.is_symlink() and "served" not in path.parts:
                assert secret.encode() not in path.read_bytes(), f"{secret} leaked into {path}"


def test_urls_inside_a_message_lose_their_credentials() -> None:
    from quantfab.tasks.redact import redact_text

    message = (f"cannot read (http://reader:{PASSWORD}@127.0.0.1:4/m/config.json); "
               f"'https://host/m?token={TOKEN}&rev=2' and s3://bucket/key stay")
    assert redact_text(message) == "cannot read (http://127.0.0.1:4/m/config.json); 'https://host/m?rev=2' and s3://bucket/key stay"
