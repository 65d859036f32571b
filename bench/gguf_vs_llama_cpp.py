"""Our GGUF files beside llama.cpp's own llama-quantize output of the same F16 model, measured side by side.

For each file type: llama_model_quantize on our F16 file (llama.cpp's RTN), and quantfab's quantize +
convert stages from the fp32 weights with rtn, gptq and awq, both on ``--threads`` threads (torch's, and the
C build of kernels/ through QUANTFAB_THREADS). Every file is
decoded by gguf-py and scored by the same forward on the recipe's validation windows (PPL, KL against
fp32, top-1); llama.cpp's own perplexity of each file is printed beside ours. Needs llama-cpp-python, or
llama.cpp's llama-quantize binary (``--llama-quantize``, bench/consumers/build_llama_cpp_tools.sh; llama.cpp's
own perplexity column is then left out).

    python bench/gguf_vs_llama_cpp.py [--model synthetic://llama?...] [--types Q8_0,Q4_0,Q4_K_M]
        [--llama-quantize ../llama-cpp-tools/llama-quantize]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks import calibrate as calibrate_mod
from quantfab.tasks import download as download_mod
from quantfab.tasks import validate as validate_mod
from quantfab.tasks.convert.gguf import GGUFTensors
from quantfab.tasks.convert.stage import convert
from quantfab.tasks.download import materialize
from quantfab.tasks.llama_cpp import llama_cpp_perplexity, llama_quantize
from quantfab.tasks.quantize.assign import reads_statistics
from quantfab.tasks.quantize.stage import quantize
from quantfab.tasks.store import Store

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tinystories-656k-q4_0.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model source instead of the recipe's (e.g. a synthetic:// Llama)")
    ap.add_argument("--types", default="Q8_0,Q4_0,Q4_K_M")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--tokens", type=int, help="validation tokens instead of the recipe's")
    ap.add_argument("--threads", type=int, default=1, help="threads for llama.cpp and for us alike (default 1)")
    ap.add_argument("--llama-quantize", type=Path, help="llama.cpp's llama-quantize binary instead of llama-cpp-python")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["QUANTFAB_THREADS"] = str(args.threads)
    types = args.types.split(",")
    overrides = [f"model.source={args.model}", "calibration.source=synthetic://tokens",
                 "validate.source=synthetic://tokens"] if args.model else []
    overrides += [f"validate.tokens={args.tokens}"] if args.tokens else []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        r = load_recipe(RECIPE, [*overrides, "outputs=[{gguf: F16}]"])
        model = download_mod.download(r.model.source, None, r.model.include, False, store)
        cals: dict[bool, Any] = {}

        def calibration(recipe: Any) -> Any:
            """What the flow's calibrate stage gives this recipe: statistics only where it reads them."""
            need = reads_statistics(*materialize(store, model.files).frozen(store.memo_dir()), recipe.quantize,
                                    list(recipe.outputs))
            if need not in cals:
                c = recipe.calibration
                cals[need] = calibrate_mod.calibrate(model, c.source, c.samples, c.seq_len, c.seed, c.text_field, "cpu",
                                                     store, need)
            return cals[need]

        f16 = convert(model, quantize(model, calibration(r), r.quantize, r.outputs, "cpu", store), r.outputs, r.name, store)
        f16_path = materialize(store, f16.files["gguf-F16"].files).path / f16.files["gguf-F16"].path
        folder = materialize(store, model.files)
        config, weights = folder.config(), folder.weights()
        files: dict[tuple[str, str], tuple[Path, float]] = {}
        for t in types:
            path = Path(tmp) / f"llama-cpp-{t}.gguf"
            files[(t, "llama.cpp rtn")] = (path, quantize_by_llama_cpp(args.llama_quantize, f16_path, path, t, args.threads))
            print(f"llama.cpp rtn {t}: {files[(t, 'llama.cpp rtn')][1]:.2f} s", flush=True)
        for method in args.methods.split(","):
            for t in types:
                rt = load_recipe(RECIPE, [*overrides, f"quantize.method={method}",  # as llama.cpp's: no imatrix
                                          f"outputs=[{{format: gguf, type: {t}, imatrix: false}}]"])
                cal = calibration(rt)  # the calibrate stage, timed apart from quantize + convert as before
                start = time.perf_counter()
                q = quantize(model, cal, rt.quantize, rt.outputs, "cpu", store)
                c = convert(model, q, rt.outputs, rt.name, store)
                seconds = time.perf_counter() - start
                f = c.files[rt.outputs[0].key]
                files[(t, f"quantfab {method}")] = (materialize(store, f.files).path / f.path, seconds)
                print(f"quantfab {method} {t}: {seconds:.2f} s", flush=True)
        ids = validate_mod.eval_windows(model, r.validate_, store)
        sources = {"fp32": weights, **{f"{t}|{who}": GGUFTensors(p, config) for (t, who), (p, _) in files.items()}}
        metrics = validate_mod.compare(config, sources, ids, "cpu")
        print(f"model {r.model.source}: {model.parameters:,} parameters; FP32 PPL {metrics['baseline_perplexity']:.2f} "
              f"on {metrics['tokens']} tokens")
        print("\n| type | built by | bits/weight | PPL (ours) | PPL (llama.cpp) | KL (nats/token) | top-1 | quantize s | ours / llama.cpp time |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (t, who), (path, seconds) in files.items():
            m = metrics["outputs"][f"{t}|{who}"]
            bpw = path.stat().st_size * 8 / model.parameters
            ratio = seconds / files[(t, "llama.cpp rtn")][1]
            theirs = "-" if args.llama_quantize else f"{llama_cpp_perplexity(path, ids):.2f}"
            print(f"| {t} | {who} | {bpw:.3f} | {m['perplexity']:.2f} | {theirs} | "
                  f"{m['kl_divergence']:.5f} | {m['top1_agreement'] * 100:.2f} % | {seconds:.2f} | {ratio:.1f}x |", flush=True)


def quantize_by_llama_cpp(binary: Path | None, src: Path, dst: Path, file_type: str, threads: int) -> float:
    """Seconds llama.cpp takes to quantize ``src``: its binary's whole run where given, else llama_model_quantize."""
    if binary is None:
        return llama_quantize(src, dst, file_type, threads)
    start = time.perf_counter()
    subprocess.run([str(binary), str(src), str(dst), file_type, str(threads)], check=True, capture_output=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
