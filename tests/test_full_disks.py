"""A disk that fills up mid-run: real `quantfab run` processes writing to a size-limited tmpfs.

The tmpfs is mounted in a private mount namespace (`unshare --user --map-root-user --mount`), so no
privilege is needed where user namespaces are allowed; where they are not, these tests skip, saying so
(tests/test_store_integrity.py injects ENOSPC at the store's write call instead).
The store filling up during convert must leave only whole, intact blobs (nothing partial, nothing
staged) and a clear error; the destination filling up while a new package is staged must leave the
previous package exactly as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
QUANTFAB = Path(sys.executable).parent / "quantfab"
LEFTOVERS = """
import json, os, sys
found = [os.path.join(d, f) for d, _, fs in os.walk(sys.argv[1]) for f in fs
         if ".tmp-" in f or f.startswith("work-") or f.endswith(".part") or ".quantfab-staging" in d]
print("LEFTOVERS " + json.dumps(found))
"""


def in_small_tmpfs(mount: Path, size: str, script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``script`` (bash) with a ``size`` tmpfs mounted at ``mount``, seen by it alone."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here to mount a size-limited tmpfs")
    mount.mkdir(parents=True, exist_ok=True)
    wrapped = f"mount -t tmpfs -o size={size} tmpfs {mount} || exit 99\n{script}"
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", wrapped],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode == 99 or "unshare: " in proc.stderr[:200]:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()[:200]}")
    return proc


def user_env(prefect_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The test session's Prefect settings, but Prefect's logging left as a user has it (the CLI quiets it)."""
    env = {**os.environ, **prefect_env, "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_LOGGING_LEVEL", None)
    return env


def quantfab(*args: str) -> str:
    return " ".join([str(QUANTFAB), *map(str, args)])


def leftovers(proc: subprocess.CompletedProcess) -> list[str]:
    line = next(line for line in proc.stdout.splitlines() if line.startswith("LEFTOVERS "))
    return json.loads(line[len("LEFTOVERS "):])


def test_the_store_filling_up_mid_run(tmp_path: Path, prefect_env) -> None:
    store, out = tmp_path / "store", tmp_path / "out"
    env = user_env(prefect_env, tmp_path)
    # the demo's download, calibrate and quantize outputs take about 31 MiB, convert needs 10 more
    script = (f"{quantfab('run', REPO / 'recipes' / 'demo.yaml', '--store', store, '--set', f'package.destination={out}')}\n"
              "echo RC=$?\n"
              f"{sys.executable} -c '{LEFTOVERS}' {store}\n"
              f"{quantfab('verify', '--store', store)}\necho VERIFY=$?\n")
    proc = in_small_tmpfs(store, "36m", script, env)
    assert "RC=2" in proc.stdout, proc.stdout + proc.stderr
    assert "this run may not fit: store" in proc.stderr and "NOT ENOUGH" in proc.stderr  # warned before it started
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert "the store (" in error and "write failed: no space left" in error and "MiB free there" in error, error
    assert "Traceback" not in proc.stderr
    assert leftovers(proc) == []
    assert "VERIFY=0" in proc.stdout, proc.stdout + proc.stderr  # every blob left is whole and intact
    assert not out.exists()


def test_the_destination_filling_up_keeps_the_previous_package(tmp_path: Path, prefect_env) -> None:
    store, out = tmp_path / "store", tmp_path / "out"
    env = user_env(prefect_env, tmp_path)
    base = ["run", REPO / "recipes" / "demo.yaml", "--store", store, "--set", f"package.destination={out}/demo"]
    # the package is about 7.5 MiB: one fits, a second one staged beside it does not
    script = (f"{quantfab(*base)} || exit 3\n"
              f"{sys.executable} -c 'import json,hashlib,pathlib; print(\"BEFORE \" + json.dumps("
              f"{{str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in pathlib.Path(\"{out}/demo\").rglob(\"*\") "
              f"if p.is_file()}}))'\n"
              f"{quantfab(*base, '--set', 'validate.gates.max_kl=0.45')}\necho RC=$?\n"
              f"{sys.executable} -c '{LEFTOVERS}' {out}\n"
              f"{quantfab('verify', out / 'demo')}\necho VERIFY=$?\n"
              f"{sys.executable} -c 'import json,hashlib,pathlib; print(\"AFTER \" + json.dumps("
              f"{{str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in pathlib.Path(\"{out}/demo\").rglob(\"*\") "
              f"if p.is_file()}}))'\n")
    proc = in_small_tmpfs(out, "12m", script, env)
    assert "RC=2" in proc.stdout, proc.stdout + proc.stderr
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert "package.destination (" in error and "no space left" in error, error
    before = next(json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("BEFORE "))
    after = next(json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("AFTER "))
    assert after == before and "VERIFY=0" in proc.stdout  # the previous package, whole and untouched
    assert leftovers(proc) == []  # no staging folder left beside it
