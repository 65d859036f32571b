"""Cold run vs the no-op answers of recipes/demo.yaml: `quantfab run` and `plan` on an up-to-date build.

1. cold: ``quantfab run recipes/demo.yaml`` with a fresh temporary ``--store`` and ``package.destination``
   (every stage runs, on the ephemeral Prefect API);
2. no-op run: the same command again in a new process (every stage cached and the package published, so it
   answers from the store without torch or Prefect: pipelines/uptodate.py);
3. the flow's no-op: the ``quantize`` flow itself on the same store, as a deployment run executes it (every
   stage a Prefect cache hit, the ephemeral API started): what a no-op cost before the up-to-date check;
4. ``quantfab plan`` on the same store and recipe;
5. ten recipes: ten copies of the demo publishing to ten destinations (built once by one flow process), then
   one ``quantfab run`` of all ten, all up to date;
6. baselines, each in a fresh process: ``import quantfab.pipelines.quantize`` (torch, transformers,
   Prefect, the tasks), and that import plus an empty Prefect flow (starts the ephemeral API).

The script prints the wall times and the ratios side by side; it asserts nothing about time.

    .venv/bin/python bench/rerun.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1, help="rounds to run (medians are printed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store, package and logs")
    args = ap.parse_args(argv)

    tmp_root = Path(tempfile.mkdtemp(prefix="quantfab-bench-rerun-"))
    print(f"recipe {RECIPE}; work dir {tmp_root}", flush=True)
    rows: dict[str, list[float]] = {}
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
        recipes = many_recipes(work)
        timed([sys.executable, "-c", FLOW, store, "[]", *recipes])  # builds the ten packages
        rows.setdefault(f"no-op `quantfab run` of {MANY} recipes", []).append(
            timed(QUANTFAB + ["run", *recipes, "--store", store]))
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
    if not args.keep:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
