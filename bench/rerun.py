"""Cold run vs no-op rerun of recipes/demo.yaml, with the fixed costs that bound the rerun.

1. cold: ``quantfab run recipes/demo.yaml`` with a fresh temporary ``--store`` and a fresh
   ``package.destination`` (every stage runs);
2. rerun: the same command again, in a new process, same store and destination (every stage should be
   a cache hit);
3. baselines, each in a fresh process with the same environment:
   * import: ``import quantfab.pipelines.quantize`` (torch, transformers, prefect, the tasks);
   * prefect: the import above plus an empty Prefect flow with one task, which starts the ephemeral
     API server (``python -m uvicorn ... prefect.server.api.server:create_app``) just as a real run does.

The script prints the wall times and the ratios side by side; it asserts nothing about time.

    /work/venv/bin/python bench/rerun.py [--repeat N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import REPO, bench_env, run_quantfab  # noqa: E402

RECIPE = "recipes/demo.yaml"

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


def timed_python(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=bench_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1, help="cold/rerun pairs to run (medians are printed)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the import / empty-flow baselines")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store, package and logs")
    args = ap.parse_args(argv)

    tmp_root = Path(tempfile.mkdtemp(prefix="quantfab-bench-rerun-"))
    print(f"recipe {RECIPE}; work dir {tmp_root}", flush=True)
    colds, reruns, imps, pres = [], [], [], []
    for i in range(args.repeat):  # interleaved, so a busy machine skews every figure alike
        work = tmp_root / f"pair{i}"
        cmd = ["run", RECIPE, "--store", str(work / "store"), "--set", f"package.destination={work / 'out'}"]
        for label, into in (("cold", colds), ("rerun", reruns)):
            res = run_quantfab(cmd, sample=False, log_dir=work / f"logs-{label}")
            stages = res.stages
            print(f"  {label:<5} #{i + 1}: {res.wall_s:6.2f} s, rc {res.returncode} (startup {res.startup_s:.2f} s, "
                  f"teardown {res.teardown_s:.2f} s); stages "
                  + ", ".join(f"{k} {v[0]} {v[1]:.2f}s" for k, v in stages.items()), flush=True)
            if res.returncode != 0:
                print(res.stderr[-3000:])
                return 1
            expected = "ran" if label == "cold" else "cached"
            if len(stages) != 6 or any(s != expected for s, _ in stages.values()):
                print(f"  warning: {label} expected every stage {expected!r}, got {stages}")
            into.append(res)
        if not args.no_baselines:
            imps.append(timed_python(IMPORT_ONLY))
            pres.append(timed_python(PREFECT_ONLY))
            print(f"  baselines #{i + 1}: import {imps[-1]:.2f} s, import + empty Prefect flow {pres[-1]:.2f} s",
                  flush=True)

    med = statistics.median
    cold = med(r.wall_s for r in colds)
    rerun = med(r.wall_s for r in reruns)
    print()
    rows = [("cold run (fresh store)", cold), ("no-op rerun (same store)", rerun)]
    if not args.no_baselines:
        imp, pre = med(imps), med(pres)
        rows += [("baseline: import quantfab flow", imp), ("baseline: import + empty Prefect flow", pre)]
    print(f"medians of {args.repeat}:")
    print("| what | wall s | / cold | / rerun |")
    print("|---|---:|---:|---:|")
    for label, secs in rows:
        print(f"| {label} | {secs:.2f} | {secs / cold:.2f} | {secs / rerun:.2f} |")
    print()
    print(f"rerun/cold = {rerun / cold:.2f}  ({rerun:.2f} s vs {cold:.2f} s)")
    hits = med(sum(v[1] for v in r.stages.values()) for r in reruns)
    up, down = med(r.startup_s for r in reruns), med(r.teardown_s for r in reruns)
    print(f"rerun breakdown: startup to the first stage {up:.2f} s, the six cache hits {hits:.2f} s, "
          f"after the last stage to exit {down:.2f} s")
    if not args.no_baselines:
        print(f"the empty Prefect flow alone is {pre / rerun:.0%} of the rerun (imports alone {imp / rerun:.0%}): "
              f"a no-op rerun is dominated by process start-up, imports and the Prefect ephemeral API server")
    if not args.keep:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
