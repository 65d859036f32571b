"""A real `quantfab run` killed with SIGKILL during calibrate, and during package, then run again.

The run's own progress lines tell where it is: the kill lands right after "download ran" (calibrate
is running) or right after "validate ran" (package is running). The rerun must finish, reuse the
stages that finished (download, and everything up to validate), and publish files whose sha256 equal an
uninterrupted run's; the destination appears only whole, manifest included (tests/test_publish.py polls it).
(Killed mid-GPTQ: tests/test_resume.py.)
"""

from __future__ import annotations

import hashlib
import json
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
SETS = ["quantize.method=rtn", "outputs=[{gguf: Q8_0}, {gguf: Q4_0}]", "calibration.samples=32", "validate.tokens=2048",
        "model.source=synthetic://llama?layers=8&hidden=256&intermediate=768&heads=4&kv_heads=2&vocab=512&seed=0"]


def launch(root: Path, prefect_env: dict[str, str]) -> subprocess.Popen:
    args = [str(QUANTFAB), "run", str(REPO / "recipes" / "demo.yaml"), "--store", str(root / "store")]
    for s in [*SETS, f"package.destination={root / 'out'}"]:
        args += ["--set", s]
    env = {**os.environ, **prefect_env, "PREFECT_HOME": str(root / "prefect-home")}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)


def published(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).as_posix() != "manifest.json"}  # charts/ included


def shipped(out: Path) -> dict[str, str]:
    """The built files; the model card quotes the recipe, whose destination differs between the runs here."""
    return {name: digest for name, digest in published(out).items() if name != "README.md"}


def consistent(out: Path) -> bool:
    """Either no manifest, or one listing exactly the files present with their sha256."""
    if not (out / "manifest.json").exists():
        return True
    listed = {f["path"]: f["sha256"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    return listed == published(out)


def kill_after(proc: subprocess.Popen, line_start: str) -> list[str]:
    """SIGKILL the run's process group as soon as it prints a line starting with ``line_start``."""
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line.rstrip())
        if line.split()[:2] == line_start.split():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return seen
    raise AssertionError("the run ended before it could be killed:\n" + "\n".join(seen))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, prefect_env) -> dict[str, str]:
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = launch(root, prefect_env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return shipped(root / "out")


def rerun(root: Path, prefect_env: dict[str, str]) -> list[str]:
    proc = launch(root, prefect_env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out.splitlines()


def stage_status(lines: list[str]) -> dict[str, str]:
    return {parts[0]: parts[1] for parts in (line.split() for line in lines) if len(parts) >= 2 and parts[1] in ("ran", "cached")}


def test_killed_during_calibrate(tmp_path: Path, prefect_env, reference: dict[str, str]) -> None:
    kill_after(launch(tmp_path, prefect_env), "download ran")
    assert not (tmp_path / "out").exists()
    status = stage_status(rerun(tmp_path, prefect_env))
    assert status["download"] == "cached" and status["calibrate"] == "ran"
    assert shipped(tmp_path / "out") == reference and consistent(tmp_path / "out")


def staging(root: Path) -> list[Path]:
    return sorted(root.glob(".out.quantfab-staging-*"))


def test_killed_during_package(tmp_path: Path, prefect_env, reference: dict[str, str]) -> None:
    out = tmp_path / "out"
    proc = launch(tmp_path, prefect_env)
    assert proc.stdout is not None
    for line in proc.stdout:  # package starts once validate is done; kill when its staging folder appears
        if line.split()[:2] == ["validate", "ran"]:
            deadline = time.monotonic() + 30
            while not staging(tmp_path) and time.monotonic() < deadline:
                time.sleep(0.0005)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
    assert staging(tmp_path) and not out.exists()  # killed mid-package: a half-filled staging folder, nothing published
    status = stage_status(rerun(tmp_path, prefect_env))
    assert all(status[s] == "cached" for s in ("download", "calibrate", "quantize", "convert", "validate")), status
    assert shipped(out) == reference and consistent(out)
    assert not staging(tmp_path)  # the dead run's was removed
