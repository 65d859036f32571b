"""Deployments: prefect.yaml agrees with recipes/, and a real server runs one end to end.

The round trip is what a team does on its server: `prefect server start` on 127.0.0.1 with a fresh
PREFECT_HOME, a process work pool, `prefect deploy --all` from the project, a worker, then
`prefect deployment run quantize/demo --watch`; the package must be published. The worker starts in
the checkout, so its flow runs import the entrypoint with the repo root on sys.path (Prefect inserts the
working directory), where transformers' `import kernels` must still get Hugging Face's package. Worker and server are
stopped by PID (the worker ignores its first SIGTERM, so it gets a second, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from quantfab.pipelines.deployments import ENTRYPOINT, MARK, WORK_POOL, recipe_deployments, synced

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_prefect_yaml_agrees_with_recipes() -> None:
    document = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert document == synced(document, REPO), "prefect.yaml is stale: run `quantfab deployments sync`"
    names = [d["name"] for d in document["deployments"] if MARK in d["tags"]]
    assert sorted(names) == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def test_sync_adds_a_new_recipe_and_keeps_hand_written_entries(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    for name in ("demo.yaml", "tinystories-656k-q4_0.yaml"):
        (tmp_path / "recipes" / name).write_text((REPO / "recipes" / name).read_text())
    hand = {"name": "nightly-report", "entrypoint": "x.y:z", "work_pool": {"name": "other"}}
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump({"name": "p", "deployments": [hand]}))
    from quantfab.pipelines.cli import main

    assert main(["deployments", "sync", "--project", str(tmp_path), "--check"]) == 1
    assert main(["deployments", "sync", "--project", str(tmp_path)]) == 0
    assert main(["deployments", "sync", "--project", str(tmp_path), "--check"]) == 0
    written = yaml.safe_load((tmp_path / "prefect.yaml").read_text())["deployments"]
    assert [d["name"] for d in written] == ["demo", "tinystories-656k-q4_0", "nightly-report"]
    assert written[0] == recipe_deployments(tmp_path)[0]
    assert written[0]["entrypoint"] == ENTRYPOINT and written[0]["work_pool"] == {"name": WORK_POOL}
    assert written[0]["parameters"] == {"recipe_path": "recipes/demo.yaml"}
    assert written[0]["tags"] == [MARK, "method:group", "format:gguf"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, signals: int = 2) -> None:
    """SIGTERM (twice for a worker), then SIGKILL: the process group, so its children go too."""
    for _ in range(signals):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class Server:
    """A real `prefect server` on 127.0.0.1 with a fresh PREFECT_HOME, the quantfab pool and one worker."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.root = root
        self.env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home"), "PYTHONPATH": "",
                    "PREFECT_API_URL": f"http://127.0.0.1:{self.port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_UI_ENABLED": "false", "QUANTFAB_STORE": str(root / "store"), "QUANTFAB_OUT": str(root / "out")}
        self.logs = root / "logs"
        self.logs.mkdir()
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *args: str, cwd: Path | None = None) -> subprocess.Popen:
        proc = subprocess.Popen([str(BIN / "prefect"), *args], env=self.env, cwd=cwd or self.root, start_new_session=True,
                                stdout=(self.logs / f"{name}.log").open("w"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def prefect(self, *args: str, cwd: Path = REPO, timeout: float = 180) -> str:
        done = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}\n{self.log('worker')}"
        return done.stdout + done.stderr

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text() if path.is_file() else ""

    def api(self, path: str, body: dict) -> list | dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.load(r)

    def wait_healthy(self, server: subprocess.Popen) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, self.log("server")
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # the worker first (it ignores its first SIGTERM), the server last
            stop(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("prefect-server"))
    t0 = time.perf_counter()
    try:
        srv.wait_healthy(srv.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(srv.port)))
        srv.prefect("work-pool", "create", WORK_POOL, "--type", "process")
        srv.start("worker", "worker", "start", "--pool", WORK_POOL, cwd=REPO)  # from the checkout, as the README says
        srv.started_s = time.perf_counter() - t0  # type: ignore[attr-defined]
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_server_round_trip_runs_the_demo_deployment(server: Server) -> None:
    t0 = time.perf_counter()
    server.prefect("deploy", "--all")
    out = server.prefect("deployment", "run", "quantize/demo", "--watch", timeout=300)
    assert "Completed" in out, out
    seconds = server.started_s + time.perf_counter() - t0  # type: ignore[attr-defined]
    (flow_run,) = server.api("flow_runs/filter", {"deployments": {"name": {"any_": ["demo"]}}})
    assert flow_run["name"] == "demo@latest" and flow_run["state_type"] == "COMPLETED"
    assert {"method:group", "format:gguf"} <= set(flow_run["tags"])
    manifest = server.root / "out" / "demo" / "manifest.json"
    assert manifest.is_file(), server.log("worker")
    published = json.loads(manifest.read_text())
    assert sorted(published["formats"]) == ["gguf-Q4_0", "gguf-Q4_1", "gguf-Q8_0"]
    assert all((manifest.parent / f["path"]).is_file() for f in published["files"])
    print(f"server round trip: {seconds:.1f} s from `prefect server start` to the published package")


TRACKED = """\
name: tracked
model:
  source: {upstream}
  track: latest
calibration: {{source: "synthetic://tokens?seed=1", samples: 4, seq_len: 64}}
quantize: {{method: rtn}}
outputs: [{{gguf: Q8_0}}]
validate: {{source: "synthetic://tokens?seed=2", tokens: 1024, window: 64, gates: {{max_kl: 1.0, min_top1: 0.0}}}}
package: {{destination: {out}}}
"""


def write_upstream(folder: Path, seed: int) -> None:
    from quantfab.tasks import synthetic

    folder.mkdir(exist_ok=True)
    synthetic.write_model(f"synthetic://llama?layers=2&hidden=64&intermediate=128&heads=2&kv_heads=1&vocab=512&seed={seed}",
                          folder)


@pytest.mark.slow
def test_watch_rebuilds_only_when_the_upstream_changes(server: Server) -> None:
    project, upstream, out = server.root / "project", server.root / "upstream", server.root / "out" / "tracked"
    (project / "recipes").mkdir(parents=True)
    write_upstream(upstream, seed=0)
    (project / "recipes" / "tracked.yaml").write_text(TRACKED.format(upstream=upstream, out=out))
    (project / "prefect.yaml").write_text(yaml.safe_dump({"name": "watch-test", "deployments": [
        {"name": "upstream", "entrypoint": "quantfab.pipelines.watch:watch", "parameters": {"recipes": "recipes"},
         "work_pool": {"name": WORK_POOL}}]}))
    from quantfab.pipelines.cli import main

    assert main(["deployments", "sync", "--project", str(project)]) == 0
    server.prefect("deploy", "--all", cwd=project)

    def watch_once() -> dict:
        out_text = server.prefect("deployment", "run", "watch/upstream", "--watch", timeout=300)
        assert "Completed" in out_text, out_text
        runs = server.api("flow_runs/filter", {"deployments": {"name": {"any_": ["tracked"]}},
                                               "sort": "EXPECTED_START_TIME_DESC"})
        return {"builds": len(runs), "latest": runs[0] if runs else None}

    def wait_built(count: int) -> dict:
        deadline = time.monotonic() + 300
        while True:
            runs = server.api("flow_runs/filter", {"deployments": {"name": {"any_": ["tracked"]}}})
            if len(runs) == count and all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED") for r in runs):
                assert all(r["state_type"] == "COMPLETED" for r in runs), server.log("worker")
                return json.loads((out / "manifest.json").read_text())
            assert time.monotonic() < deadline, server.log("worker")
            time.sleep(1)

    first = watch_once()
    assert first["builds"] == 1  # nothing published yet: the first watch starts a build
    built = wait_built(1)
    assert built["source_revision"].startswith("upstream-")
    assert watch_once()["builds"] == 1  # same upstream: nothing started
    write_upstream(upstream, seed=1)  # the upstream publishes new weights
    assert watch_once()["builds"] == 2
    rebuilt = wait_built(2)
    assert rebuilt["source_revision"] != built["source_revision"]
    assert rebuilt["files"] != built["files"]


def test_upstream_revision_changes_with_the_weights_and_the_config_only(tmp_path: Path) -> None:
    from quantfab.tasks.download import upstream_revision

    write_upstream(tmp_path, seed=0)
    first = upstream_revision(str(tmp_path))
    assert first == upstream_revision(str(tmp_path)) and first.startswith("upstream-")
    (tmp_path / "README.md").write_text("not part of the revision")
    assert upstream_revision(str(tmp_path)) == first
    write_upstream(tmp_path, seed=1)
    second = upstream_revision(str(tmp_path))
    assert second != first
    config = tmp_path / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps_"'))
    assert upstream_revision(str(tmp_path)) not in (first, second)
