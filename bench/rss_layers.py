"""Peak RSS of `quantfab run` against model depth: does memory stay flat as layers are added?

Runs ``quantfab run bench/recipes/synthetic-base.yaml`` once per layer count on a synthetic Llama
(hidden 1024 by default), each with a fresh temporary ``--store`` and ``package.destination`` so every
stage really runs. While each run is alive the whole process tree is polled with psutil every ~50 ms:

* tree peak: max over samples of the summed RSS of ``quantfab run`` and all its descendants, EXCEPT the
  Prefect ephemeral API server (``python -m uvicorn ... prefect.server.api.server:create_app``, a child
  that Prefect starts; its size does not depend on the model, so it is reported separately);
* main peak: max over samples of the ``quantfab run`` process alone;
* main HWM: the kernel's high-water mark for the ``quantfab run`` process (``ru_maxrss`` from wait4;
  exact, not sampled; it is the max over the process and its reaped children, and the server is smaller).

Goal: peak RSS of the 16-layer run <= 1.25 x the 2-layer run. ``--family qwen3_moe`` runs a mixture of
experts instead (``--experts``, ``--expert-intermediate``): its experts are calibrated per expert.

    /work/venv/bin/python bench/rss_layers.py [--layers 2 4 8 16] [--hidden 1024] [--interval 0.05]
    /work/venv/bin/python bench/rss_layers.py --family qwen3_moe --layers 2 12 --experts 8
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import MiB, REPO, bench_env, run_quantfab  # noqa: E402

RECIPE = "bench/recipes/synthetic-base.yaml"
GOAL = 1.25


def model_source(args: argparse.Namespace, layers: int) -> str:
    experts = "" if args.family == "llama" else f"&experts={args.experts}&expert_intermediate={args.expert_intermediate}"
    return (f"synthetic://{args.family}?layers={layers}&hidden={args.hidden}&intermediate={args.intermediate}"
            f"&heads={args.heads}&kv_heads={args.kv_heads}&vocab={args.vocab}&seed=0{experts}")


def fp32_mib(source: str) -> float:
    """The model's weights in fp32, from the synthetic source's headers."""
    from quantfab.tasks.synthetic import headers

    with tempfile.TemporaryDirectory() as folder:
        return sum(t.numel for t in headers(source, Path(folder)).values()) * 4 / MiB


def _import_hwm() -> int:
    code = ("import resource, quantfab.pipelines.quantize; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=bench_env(), check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1]) * 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--family", default="llama", help="any model type synthetic:// writes, e.g. qwen3_moe")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--expert-intermediate", type=int, default=704)
    ap.add_argument("--interval", type=float, default=0.05, help="psutil polling period, seconds")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra recipe overrides passed to every run (e.g. quantize.method=group)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary stores, packages and logs")
    args = ap.parse_args(argv)

    rows = []
    tmp_root = Path(tempfile.mkdtemp(prefix="quantfab-bench-rss-"))
    print(f"recipe {RECIPE}; {args.family}, hidden {args.hidden}, intermediate {args.intermediate}, heads {args.heads}/"
          f"{args.kv_heads}, vocab {args.vocab}; polling every {args.interval * 1000:.0f} ms; work dir {tmp_root}",
          flush=True)
    for n in args.layers:
        work = tmp_root / f"layers{n}"
        src = model_source(args, n)
        cmd = ["run", RECIPE, "--store", str(work / "store"), "--set", f"model.source={src}",
               "--set", f"package.destination={work / 'out'}"]
        for kv in args.extra:
            cmd += ["--set", kv]
        res = run_quantfab(cmd, sample=True, interval=args.interval, log_dir=work / "logs", env=bench_env())
        stages = res.stages
        if res.returncode != 0 or any(s != "ran" for s, _ in stages.values()) or len(stages) != 6:
            print(f"layers {n}: run failed or did not run every stage (rc {res.returncode}, stages {stages})")
            print(res.stderr[-3000:])
            return 1
        model = fp32_mib(src)
        rows.append((n, res, model))
        print(f"  layers {n:>2}: tree {res.peak_tree_rss / MiB:7.1f} MiB, main {res.peak_main_rss / MiB:7.1f} MiB, "
              f"wall {res.wall_s:6.1f} s, {res.samples} samples; stages "
              + ", ".join(f"{k} {v[1]:.1f}s" for k, v in stages.items()), flush=True)

    base_tree = rows[0][1].peak_tree_rss
    base_main = rows[0][1].peak_main_rss
    base_hwm = rows[0][1].main_hwm_rss
    print()
    print("Prefect API server excluded from 'tree' (matched 'prefect' + 'server'/'uvicorn' in the command line):")
    for cmd in sorted({c for _, r, _ in rows for c in r.excluded.values()}):
        print(f"  {cmd[:160]}")
    others = sorted({c for _, r, _ in rows for c in r.included.values()})
    print("other children counted in 'tree': " + ("; ".join(c[:120] for c in others) if others else "none"))
    print()
    print(f"| layers | fp32 weights MiB | peak RSS MiB (tree, no server) | ratio to {rows[0][0]}L | main peak MiB "
          f"| main ratio | main HWM MiB (wait4) | HWM ratio | server peak MiB | wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, r, model in rows:
        print(f"| {n} | {model:.0f} | {r.peak_tree_rss / MiB:.0f} | {r.peak_tree_rss / base_tree:.2f} "
              f"| {r.peak_main_rss / MiB:.0f} | {r.peak_main_rss / base_main:.2f} "
              f"| {r.main_hwm_rss / MiB:.0f} | {r.main_hwm_rss / base_hwm:.2f} "
              f"| {r.peak_server_rss / MiB:.0f} | {r.wall_s:.1f} |")
    print()
    imports = _import_hwm()
    print(f"for scale: importing the flow module alone (quantfab.pipelines.quantize) peaks at {imports / MiB:.0f} MiB")
    first, last = rows[0], rows[-1]
    ratio = last[1].peak_tree_rss / first[1].peak_tree_rss
    verdict = "MET" if ratio <= GOAL else "MISSED"
    print(f"goal: peak RSS ratio {last[0]}L/{first[0]}L <= {GOAL}; measured {ratio:.2f} (tree, server excluded), "
          f"{last[1].main_hwm_rss / first[1].main_hwm_rss:.2f} (main HWM) -> {verdict}")
    if len(rows) > 1:
        per_layer = (last[1].peak_tree_rss - first[1].peak_tree_rss) / MiB / (last[0] - first[0])
        layer_mib = (fp32_mib(model_source(args, 2)) - fp32_mib(model_source(args, 1)))
        print(f"slope: {per_layer:.1f} MiB of peak RSS per added layer (one layer is {layer_mib:.1f} MiB in fp32)")
    if not args.keep:
        import shutil

        shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
