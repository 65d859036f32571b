"""Cold run vs the no-op answers of recipes/demo.yaml: `quantfab run` and `plan` on an up-to-date build.

1. cold: ``quantfab run recipes/demo.yaml`` with a fresh temporary ``--store`` and ``package.destination``
   (every stage runs, on the ephemeral Prefect API);
2. no-op run: the same command again in a new process (every stage cached and the package published, so it
   answers from the store without torch or Prefect: pipelines/uptodate.py);
3. the flow's no-op: the ``quantize`` flow itself on the same store, as a deployment run executes it (every
   stage a Prefect cache hit, the ephemeral API started): what a no-op cost before the up-to-date check;
4. ``quantfab plan`` on the same store: of the recipe, of the recipe with a changed method (calibrate and
   what follows would run), and ``--base HEAD`` in a git checkout whose working tree changes the recipe so
   (what a pull request's review runs); all read the model's frozen config memoized by the cold run;
5. ten recipes: ten copies of the demo publishing to ten destinations (built once by one flow process), then
   one ``quantfab run`` of all ten, all up to date;
6. a changed gate (validate and package run, the rest cached) on the ephemeral API, then the same on a
   ``prefect server`` already up (``PREFECT_API_URL``), what a team running a server gets;
7. baselines, each in a fresh process: ``import quantfab.pipelines.quantize`` (torch, transformers,
   Prefect, the tasks), and that import plus an empty Prefect flow (starts the ephemeral API).

The script prints the wall times and the ratios side by side; it asserts nothing about time.

    .venv/bin/python bench/rerun.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import QUANTFAB, REPO, bench_env, run_quantfab  # noqa: E402

RECIPE = "recipes/demo.yaml"
MANY = 10

IMPORT_ONLY = "import quantfab.pipelines.quantize"
PREFECT_ONLY = """
import quantfab.pipelines.quantize
from prefect import flow, task

@task
def noop():
    return 1

@flow(name="bench-noop")
def empty():
    return noop()

empty()
"""
FLOW = ("import json, sys\nfrom quantfab.pipelines.quantize import quantize\n"
        "for r in sys.argv[3:]:\n    quantize(r, json.loads(sys.argv[2]), sys.argv[1])")  # store, overrides, recipes


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, env=bench_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def many_recipes(work: Path) -> list[str]:
    """Ten copies of the demo, each publishing to its own destination (all other stages shared)."""
    text = (REPO / RECIPE).read_text()
    paths = []
    for i in range(MANY):
        path = work / "recipes" / f"demo-{i}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("destination: ${QUANTFAB_OUT:-../out}/demo", f"destination: {work / 'many' / str(i)}"))
        paths.append(str(path))
    return paths


def changed_checkout(work: Path) -> Path:
    """A git checkout whose HEAD holds the demo recipe and whose working tree changes its method."""
    root = work / "checkout"
    (root / "recipes").mkdir(parents=True)
    text = (REPO / RECIPE).read_text()
    (root / RECIPE).write_text(text)
    env = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b",
           "PATH": "/usr/bin:/bin"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "base"]):
        subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, env=env)
    (root / RECIPE).write_text(text.replace("method: group", "method: gptq"))
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1, help="rounds to run (medians are printed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store, package and logs")
    args = ap.parse_args(argv)

    tmp_root = Path(tempfile.mkdtemp(prefix="quantfab-bench-rerun-"))
    print(f"recipe {RECIPE}; work dir {tmp_root}", flush=True)
    rows: dict[str, list[float]] = {}
    server, server_url = prefect_server(tmp_root)
    try:
        return measure(args, tmp_root, rows, server_url)
    finally:
        server.terminate()
        server.wait(timeout=30)
        if not args.keep:
            shutil.rmtree(tmp_root, ignore_errors=True)


def prefect_server(root: Path) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free port of 127.0.0.1 with its own PREFECT_HOME, once healthy."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    home = root / "prefect-server-home"
    home.mkdir(parents=True)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=bench_env({"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}),
                            stdout=(root / "prefect-server.log").open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"prefect server did not come up: {(root / 'prefect-server.log').read_text()[-2000:]}")


def measure(args: argparse.Namespace, tmp_root: Path, rows: dict[str, list[float]], server_url: str) -> int:
    for i in range(args.repeat):  # interleaved, so a busy machine skews every figure alike
        work = tmp_root / f"round{i}"
        store, dest = str(work / "store"), f"package.destination={work / 'out'}"
        cmd = ["run", RECIPE, "--store", store, "--set", dest]
        for label, expected in (("cold run (fresh store)", "ran"), ("no-op `quantfab run`", "cached")):
            res = run_quantfab(cmd, sample=False, log_dir=work / f"logs-{expected}")
            if res.returncode != 0 or len(res.stages) != 6 or any(s != expected for s, _ in res.stages.values()):
                print(f"{label}: rc {res.returncode}, stages {res.stages}\n{res.stderr[-3000:]}")
                return 1
            rows.setdefault(label, []).append(res.wall_s)
        rows.setdefault("no-op through the flow (Prefect cache hits)", []).append(
            timed([sys.executable, "-c", FLOW, store, json.dumps([dest]), RECIPE]))
        rows.setdefault("`quantfab plan`", []).append(timed(QUANTFAB + ["plan", RECIPE, "--store", store, "--set", dest]))
        rows.setdefault("`quantfab plan` of a changed recipe", []).append(
            timed(QUANTFAB + ["plan", RECIPE, "--store", store, "--set", dest, "--set", "quantize.method=gptq"]))
        rows.setdefault("`quantfab plan --base HEAD` (one recipe changed)", []).append(
            timed(QUANTFAB + ["plan", "--base", "HEAD", "--project", str(changed_checkout(work)), "--store", store]))
        recipes = many_recipes(work)
        timed([sys.executable, "-c", FLOW, store, "[]", *recipes])  # builds the ten packages
        rows.setdefault(f"no-op `quantfab run` of {MANY} recipes", []).append(
            timed(QUANTFAB + ["run", *recipes, "--store", store]))
        for k, (where, extra) in enumerate((("ephemeral API", {}), ("a running server", {"PREFECT_API_URL": server_url}))):
            gate = f"validate.gates.max_kl={0.9 - 0.01 * k}"  # a gate no earlier run had: validate runs
            res = run_quantfab([*cmd, "--set", gate], sample=False, env=bench_env(extra), log_dir=work / f"logs-gate-{k}")
            if res.returncode != 0 or res.stages.get("validate", ("",))[0] != "ran":
                print(f"changed gate, {where}: rc {res.returncode}, stages {res.stages}\n{res.stderr[-3000:]}")
                return 1
            rows.setdefault(f"changed gate, {where}", []).append(res.wall_s)
        rows.setdefault("baseline: import quantfab flow", []).append(timed([sys.executable, "-c", IMPORT_ONLY]))
        rows.setdefault("baseline: import + empty Prefect flow", []).append(timed([sys.executable, "-c", PREFECT_ONLY]))
        print(f"  round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items()), flush=True)

    med = {label: statistics.median(v) for label, v in rows.items()}
    cold, noop = med["cold run (fresh store)"], med["no-op `quantfab run`"]
    print(f"\nmedians of {args.repeat}:")
    print("| what | wall s | / cold | / no-op run |")
    print("|---|---:|---:|---:|")
    for label, secs in med.items():
        print(f"| {label} | {secs:.2f} | {secs / cold:.2f} | {secs / noop:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
