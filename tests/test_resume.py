"""A real `quantfab run` killed with SIGKILL in the middle of GPTQ resumes from its per-layer checkpoints."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
QUANTFAB = Path(sys.executable).parent / "quantfab"
LAYERS = 6
SETS = ["quantize.method=gptq", "outputs=[{gguf: Q4_0}]", "calibration.samples=16", "validate.tokens=1024",
        f"model.source=synthetic://llama?layers={LAYERS}&hidden=128&intermediate=352&heads=4&kv_heads=2&vocab=512&seed=0"]


def launch(root: Path, prefect_env: dict[str, str]) -> subprocess.Popen:
    home = root / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    args = [str(QUANTFAB), "run", str(REPO / "recipes" / "demo.yaml"), "--store", str(root / "store")]
    for s in [*SETS, f"package.destination={root / 'out'}"]:
        args += ["--set", s]
    env = {**os.environ, **prefect_env, "PREFECT_HOME": str(home)}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def checkpoints(root: Path) -> dict[str, float]:
    folder = root / "store" / "refs" / "quantize-layer"
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} if folder.is_dir() else {}


def gguf_digest(root: Path) -> str:
    (path,) = (p for p in (root / "out").glob("*.gguf") if not p.name.endswith(".imatrix.gguf"))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_mid_gptq_resumes_without_redoing_layers_and_matches_an_uninterrupted_run(tmp_path: Path,
                                                                                           prefect_env) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = launch(whole, prefect_env)
    victim = launch(killed, prefect_env)
    deadline = time.monotonic() + 600
    while len(checkpoints(killed)) < 2:
        assert victim.poll() is None, f"run ended before it could be killed:\n{victim.stdout.read()}"
        assert time.monotonic() < deadline, "no layer was committed within 10 minutes"
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    committed = checkpoints(killed)
    assert 2 <= len(committed) < LAYERS, f"killed after {len(committed)} of {LAYERS} layers: not mid-quantize"
    assert not (killed / "out" / "manifest.json").exists()

    resumed = launch(killed, prefect_env)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    ref_out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_out

    after = checkpoints(killed)
    assert len(after) == LAYERS
    assert {k: after[k] for k in committed} == committed, "a committed layer was quantized again"
    assert gguf_digest(killed) == gguf_digest(whole)
