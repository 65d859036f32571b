"""Concurrent runs on one store: real `quantfab run` processes started together.

Two runs of the same recipe (one destination) and two different recipes must all finish; every store
write is a temporary file renamed into place, so neither run ever sees a partial blob, and the package
left at the destination is whole: its manifest lists exactly the files there, with their sha256.
Each stage is computed once: a run holds its stage's lock (tasks/locks.py) while the others wait for it,
so of two runs of one recipe exactly one says "ran" for each stage and the other "cached".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = ("download", "calibrate", "allocate", "quantize", "convert", "validate", "package")
VARIANT = """\
extends: {demo}
name: demo-rtn
quantize: {{method: rtn}}
outputs: [{{gguf: Q8_0}}]
package: {{destination: {out}}}
"""


def start(recipe: Path, store: Path, home: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(home), "QUANTFAB_OUT": str(out)}
    return subprocess.Popen([str(Path(sys.executable).parent / "quantfab"), "run", str(recipe), "--store", str(store)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def whole(package: Path) -> bool:
    manifest = json.loads((package / "manifest.json").read_text())
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    present = {p.relative_to(package).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in package.rglob("*") if p.is_file() and p.name != "manifest.json"}
    return listed == present


def finished(proc: subprocess.Popen) -> dict[str, str]:
    """The run's status of each stage (its progress lines), once it has exited 0."""
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr
    return {p[0]: p[1] for p in (line.split() for line in stderr.splitlines()) if len(p) >= 2 and p[1] in ("ran", "cached")}


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(2))
def test_two_runs_of_one_recipe_started_together_compute_each_stage_once(tmp_path: Path, attempt: int) -> None:
    """Again on a fresh store, where a race between the two would show."""
    demo, store, out = REPO / "recipes" / "demo.yaml", tmp_path / "store", tmp_path / "out"
    runs = [start(demo, store, tmp_path / f"home-{i}", out) for i in range(2)]
    statuses = [finished(proc) for proc in runs]
    for stage in STAGES:
        assert sorted([statuses[0][stage], statuses[1][stage]]) == ["cached", "ran"], statuses
    assert whole(out / "demo")


@pytest.mark.slow
def test_concurrent_runs_on_one_store_all_finish_whole(tmp_path: Path) -> None:
    store, out = tmp_path / "store", tmp_path / "out"
    demo = REPO / "recipes" / "demo.yaml"
    variant = tmp_path / "demo-rtn.yaml"
    shutil.copy(demo, tmp_path / "demo.yaml")  # extends: stays inside the recipe's project
    variant.write_text(VARIANT.format(demo="demo.yaml", out=out / "demo-rtn"))
    runs = [start(demo, store, tmp_path / f"home-{i}", out) for i in range(2)]  # the same recipe twice
    runs.append(start(variant, store, tmp_path / "home-2", out))  # and another recipe, same store
    statuses = [finished(proc) for proc in runs]
    assert [s["download"] for s in statuses].count("ran") == 1  # one model, downloaded once for all three
    for stage in STAGES:  # the other recipe may have computed a stage both share (then both runs find it cached)
        assert [statuses[0][stage], statuses[1][stage]].count("ran") <= 1, statuses
    assert whole(out / "demo") and whole(out / "demo-rtn")
    assert sorted(p.name for p in out.iterdir()) == ["demo", "demo-rtn"]  # no staging folder or old package left
    leftovers = [p for p in store.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.endswith(".part"))]
    assert leftovers == []
