"""A 1.1B-parameter Llama end to end: quantfab's stage times and peak RSS beside llama.cpp's quantize and
llm-compressor's oneshot GPTQ, measured side by side in one run; plan's memory estimate beside the measured peak;
the validate stage's tokens/s beside a plain transformers forward of the same models on the same tokens.

The model is synthetic (TinyLlama-1.1B's shape: hidden 2048, 22 layers, ffn 5632, 32/4 heads, vocab 32000;
random weights, fp32): time and memory do not depend on the weights. Parts, each a subprocess sampled for
RSS every ``--interval`` s (the Prefect API server left out of quantfab's figure, as in rss_layers.py):

1. ``quantfab run bench/recipes/llama-1b-rtn-q4km.yaml`` into a fresh store (every stage runs);
2. ``quantfab run bench/recipes/llama-1b-gptq-int4.yaml`` into the same store (download is cached);
3. the same rtn recipe with one ``gguf: F16`` output, then llama.cpp's ``llama_model_quantize`` on that F16
   file to Q4_K_M with the same thread count (needs the ``llama-cpp`` extra);
4. llm-compressor's oneshot GPTQ W4A16 (group 128, symmetric, lm_head kept) on the same model folder and the
   exact calibration rows quantfab used, in the peer venv (``--peer-python``, see bench/peer/README.md);
5. in this process: transformers' forward of the fp32 model and of the Q4_K_M file (dequantized by
   transformers' own GGUF loader) on the validate stage's windows, with the same float64 KL.

    /work/main/.venv/bin/python bench/end_to_end_1b.py [--parts ours-rtn ours-gptq llama-cpp peer forward]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import MiB, RunResult, bench_env, run_command, run_quantfab  # noqa: E402

from quantfab.pipelines.plan import RUNTIME  # noqa: E402

RTN = "bench/recipes/llama-1b-rtn-q4km.yaml"
GPTQ = "bench/recipes/llama-1b-gptq-int4.yaml"
PARTS = ["ours-rtn", "ours-gptq", "llama-cpp", "peer", "forward"]
BUILD = ("calibrate", "quantize", "convert", "package")  # the build proper: no download, no validate


def planned_memory(recipe: str, overrides: list[str], store: Path) -> dict[str, int]:
    """What ``quantfab plan`` predicts for this run: each stage's peak working memory and, as "run", its peak RSS."""
    from quantfab.pipelines.plan import plan
    from quantfab.pipelines.recipe_loading import load_recipe

    p = plan(load_recipe(recipe, overrides), str(store))
    return {**p.memory, "run": p.peak_rss or 0}


def ours(recipe: str, store: Path, dest: Path, work: Path, interval: float, extra: list[str] = ()) -> RunResult:
    overrides = [f"package.destination={dest}", *extra]
    planned = planned_memory(recipe, overrides, store)
    res = run_quantfab(["run", recipe, "--store", str(store), *[a for o in overrides for a in ("--set", o)]],
                       sample=True, interval=interval, log_dir=work / f"log-{Path(recipe).stem}{len(extra)}")
    if res.returncode != 0:
        sys.exit(f"quantfab run {recipe} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    res.planned = planned  # type: ignore[attr-defined]
    return res


def show_ours(name: str, res: RunResult) -> None:
    peaks, planned = res.stage_peaks(), res.planned  # type: ignore[attr-defined]
    print(f"\n{name}: wall {res.wall_s:.1f} s, peak RSS {res.peak_tree_rss / MiB:,.0f} MiB (tree, server excluded; "
          f"server {res.peak_server_rss / MiB:,.0f} MiB), main HWM {res.main_hwm_rss / MiB:,.0f} MiB")
    print(f"  plan predicted peak RSS {planned['run'] / MiB:,.0f} MiB: measured / predicted "
          f"{res.main_hwm_rss / planned['run']:.2f}")
    print("  | stage | ran | seconds | peak RSS MiB | plan's RSS MiB (process + stage) |\n  |---|---|---|---|---|")
    for stage, (how, secs) in res.stages.items():
        print(f"  | {stage} | {how} | {secs:.1f} | {peaks.get(stage, 0) / MiB:,.0f} | "
              f"{(RUNTIME + planned.get(stage, 0)) / MiB:,.0f} |")


def build_seconds(res: RunResult) -> float:
    return sum(secs for stage, (how, secs) in res.stages.items() if stage in BUILD)


def only_file(folder: Path, suffix: str) -> Path:
    found = sorted(folder.rglob(f"*{suffix}"))
    if len(found) != 1:
        sys.exit(f"expected one *{suffix} under {folder}, found {found}")
    return found[0]


def llama_cpp_quantize(f16: Path, work: Path, threads: int, interval: float) -> tuple[RunResult, dict]:
    code = ("import json, sys; from quantfab.tasks.llama_cpp import llama_quantize; "
            f"print(json.dumps({{'seconds': llama_quantize(sys.argv[1], sys.argv[2], 'Q4_K_M', {threads})}}))")
    res = run_command([sys.executable, "-c", code, str(f16), str(work / "llama-cpp-Q4_K_M.gguf")], sample=True,
                      interval=interval, log_dir=work / "log-llama-cpp", env=bench_env())
    if res.returncode != 0:
        sys.exit(f"llama_model_quantize failed:\n{res.stderr[-3000:]}")
    return res, json.loads(res.stdout.strip().splitlines()[-1])


def calibration_rows(recipe_path: str) -> np.ndarray:
    """The exact (samples, seq_len) token rows the calibrate stage reads for this recipe."""
    from quantfab.pipelines.recipe_loading import load_recipe
    from quantfab.tasks.texts import read_tokens, sampled_windows

    r = load_recipe(recipe_path, [])
    c = r.calibration
    ids = read_tokens(c.source, None, VOCAB, c.samples * (c.seq_len - 1) * 4, c.text_field)
    return sampled_windows(ids, c.seq_len, c.samples, BOS, c.seed, c.source)


def validation_windows(recipe_path: str) -> np.ndarray:
    from quantfab.pipelines.recipe_loading import load_recipe
    from quantfab.tasks.texts import read_tokens, windows

    v = load_recipe(recipe_path, []).validate_
    count = max(v.tokens // v.window, 1)
    return windows(read_tokens(v.source, None, VOCAB, count * (v.window - 1), v.text_field), v.window, count, BOS,
                   v.source, "validate")


def peer(model_dir: Path, rows_path: Path, work: Path, python: str, threads: int, interval: float) -> tuple[RunResult, dict]:
    env = bench_env({"OMP_NUM_THREADS": str(threads)})
    res = run_command([python, "bench/peer/llmcompressor_1b.py", str(model_dir), str(rows_path), str(work / "peer-out")],
                      sample=True, interval=interval, log_dir=work / "log-peer", env=env)
    if res.returncode != 0:
        sys.exit(f"llm-compressor failed:\n{res.stderr[-3000:]}")
    return res, json.loads(res.stdout.strip().splitlines()[-1])


def transformers_forward(model_dir: Path, gguf: Path, ids: np.ndarray) -> dict[str, float]:
    """Seconds to load and to run each model on ``ids`` window by window, and the float64 KL, as validate does."""
    import torch
    from transformers import AutoModelForCausalLM

    out: dict[str, float] = {}
    logp = {}
    for name, kwargs in {"fp32": {}, "q4_k_m": {"gguf_file": gguf.name}}.items():
        t0 = time.perf_counter()
        where = gguf.parent if kwargs else model_dir
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32, **kwargs).eval()
        out[f"{name} load s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            lg = torch.cat([model(input_ids=torch.from_numpy(w[None, :-1])).logits[0] for w in ids])
        out[f"{name} forward s"] = time.perf_counter() - t0
        logp[name] = torch.log_softmax(lg.double(), dim=-1)
        del model, lg
    base = logp["fp32"]
    out["kl"] = float((base.exp() * (base - logp["q4_k_m"])).sum(-1).mean())
    return out


VOCAB, BOS = 32000, 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", choices=PARTS, default=PARTS)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's and the peer's threads")
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--keep", action="store_true", help="keep the temporary store, models and logs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quantfab-bench-e2e-"))
    store, out = work / "store", work / "out"
    print(f"work dir {work}; {os.cpu_count()} cores; threads {args.threads}", flush=True)
    results: dict[str, object] = {}
    try:
        if "ours-rtn" in args.parts:
            results["rtn"] = r = ours(RTN, store, out / "rtn", work, args.interval)
            show_ours("quantfab rtn -> GGUF Q4_K_M", r)
        if "ours-gptq" in args.parts:
            results["gptq"] = r = ours(GPTQ, store, out / "gptq", work, args.interval)
            show_ours("quantfab gptq -> compressed-tensors int4 g128", r)
        if "llama-cpp" in args.parts:
            f16 = ours(RTN, store, out / "f16", work, args.interval, ["outputs=[{gguf: F16}]"])
            print(f"\nour F16 GGUF (llama.cpp's input): build {build_seconds(f16):.1f} s")
            res, info = llama_cpp_quantize(only_file(out / "f16", ".gguf"), work, args.threads, args.interval)
            results["llama"] = (res, info)
            print(f"llama.cpp llama_model_quantize F16 -> Q4_K_M ({args.threads} threads): {info['seconds']:.1f} s, "
                  f"process wall {res.wall_s:.1f} s, peak RSS {res.peak_tree_rss / MiB:,.0f} MiB, "
                  f"HWM {res.main_hwm_rss / MiB:,.0f} MiB")
        if "peer" in args.parts or "forward" in args.parts:
            from safetensors.numpy import save_file

            from quantfab.pipelines.recipe_loading import load_recipe
            from quantfab.tasks.synthetic import write_model

            model_dir = work / "hf-model"
            write_model(load_recipe(RTN, []).model.source, model_dir)
        if "peer" in args.parts:
            rows = calibration_rows(GPTQ)
            save_file({"input_ids": rows}, str(work / "rows.safetensors"))
            res, info = peer(model_dir, work / "rows.safetensors", work, args.peer_python, args.threads, args.interval)
            results["peer"] = (res, info)
            print(f"\nllm-compressor oneshot GPTQ W4A16 g128 ({rows.shape[0]} x {rows.shape[1]} tokens, "
                  f"{info['threads']} threads): load {info['phases']['load']:.1f} s, oneshot "
                  f"{info['phases']['oneshot']:.1f} s, save {info['phases']['save']:.1f} s; wall {res.wall_s:.1f} s, "
                  f"peak RSS {res.peak_tree_rss / MiB:,.0f} MiB, HWM {res.main_hwm_rss / MiB:,.0f} MiB")
        if "forward" in args.parts and "rtn" in results:
            ids = validation_windows(RTN)
            fw = transformers_forward(model_dir, only_file(out / "rtn", ".gguf"), ids)
            results["forward"] = fw
            print(f"\ntransformers forward on the validate windows ({ids.shape[0]} x {ids.shape[1]}): "
                  + ", ".join(f"{k} {v:.2f}" if k != "kl" else f"KL {v:.6f}" for k, v in fw.items()))
        ratios(results)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def ratios(results: dict) -> None:
    print("\nratios (measured above, in this run):")
    rtn, gptq = results.get("rtn"), results.get("gptq")
    if "peer" in results and gptq:
        res, info = results["peer"]
        print(f"  peak RSS, ours gptq / llm-compressor: {gptq.main_hwm_rss / res.main_hwm_rss:.2f} (target <= 0.3)")
        q = gptq.stages["quantize"][1]
        cq = q + gptq.stages["calibrate"][1]
        print(f"  GPTQ, our quantize stage / oneshot: {q / info['phases']['oneshot']:.2f} (target <= 0.5); "
              f"calibrate + quantize / oneshot: {cq / info['phases']['oneshot']:.2f}")
    if "llama" in results and rtn:
        res, info = results["llama"]
        print(f"  RTN Q4_K_M build ({' + '.join(BUILD)}) / llama_model_quantize: "
              f"{build_seconds(rtn) / info['seconds']:.2f} (target <= 1.5); convert alone / it: "
              f"{rtn.stages['convert'][1] / info['seconds']:.2f}")
    if "forward" in results and rtn:
        fw = results["forward"]
        forward = fw["fp32 forward s"] + fw["q4_k_m forward s"]
        print(f"  validate stage / transformers forward of both models: {rtn.stages['validate'][1] / forward:.2f} "
              f"(target <= 1.5); / load + forward: "
              f"{rtn.stages['validate'][1] / (forward + fw['fp32 load s'] + fw['q4_k_m load s']):.2f}")
    for name, res in (("rtn", rtn), ("gptq", gptq)):
        if res:
            print(f"  {name}: measured peak RSS / plan's prediction: "
                  f"{res.main_hwm_rss / res.planned['run']:.2f} (target within 0.8-1.2)")


if __name__ == "__main__":
    main()
