"""A size budget against llama.cpp's fixed mixes: GGUF Q4_K_M and Q3_K_M beside the mix the allocate stage searches
for the same tensor bytes (``target_bits_per_weight`` = the fixed mix's own), on the same model and calibration.

Both sides round to nearest with the same importance matrix (ours; our Q4_K_M/Q3_K_M bytes equal llama-quantize's
with it, tests/test_imatrix.py), so what differs is only which type each Linear gets. With ``--tools`` llama.cpp's own
llama-quantize --imatrix builds the fixed mixes too, from our F32 file. Every file is decoded by gguf-py and scored by
one forward on the recipe's validation windows (PPL, KL against fp32, top-1); bits/weight are the file's tensor bytes
(llama.cpp's BPW) and its whole size, per model parameter.

    python bench/size_budget.py [--model /work/models/ts256-1k] [--types Q4_K_M,Q3_K_M] [--tools ../llama-cpp-tools]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import torch

from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks import calibrate as calibrate_mod
from quantfab.tasks import download as download_mod
from quantfab.tasks import validate as validate_mod
from quantfab.tasks.convert.gguf import GGUFOptions, GGUFTensors
from quantfab.tasks.convert.stage import convert
from quantfab.tasks.download import materialize
from quantfab.tasks.quantize.allocate import allocate
from quantfab.tasks.quantize.stage import quantize
from quantfab.tasks.store import Store

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tinystories-656k-q4_0.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model.source instead of the recipe's (a folder or URL)")
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M")
    ap.add_argument("--tools", type=Path, help="folder with llama-quantize: build the fixed mixes with it too")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["QUANTFAB_THREADS"] = str(args.threads)
    types = args.types.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        chosen = [f"model.source={args.model}"] if args.model else []
        base = load_recipe(RECIPE, [*chosen, "quantize.method=rtn"])
        model = download_mod.download(base.model.source, None, base.model.include, False, store)
        c = base.calibration
        calibration = calibrate_mod.calibrate(model, c.source, c.samples, c.seq_len, c.seed, c.text_field, "cpu",
                                              store, True, diagonal=True)

        def build(outputs: str) -> dict[str, Path]:
            r = load_recipe(RECIPE, [*chosen, "quantize.method=rtn", f"outputs={outputs}"])
            allocation = allocate(model, calibration, r.quantize, r.outputs, "cpu", store)
            done = convert(model, quantize(model, calibration, r.quantize, r.outputs, "cpu", store, allocation),
                           r.outputs, r.name, store, calibration)
            for key, a in allocation.outputs.items():
                mix = ", ".join(f"{n} {g}" for g, n in Counter(a.types.values()).most_common())
                print(f"{key}: {mix}", flush=True)
            return {k: materialize(store, f.files).path / f.path for k, f in done.files.items()}

        fixed = build("[" + ", ".join(f"{{format: gguf, type: {t}}}" for t in types) + "]")
        files = {f"{t} (quantfab)": fixed[GGUFOptions(type=t).key] for t in types}
        if args.tools:
            f32 = build("[{format: gguf, type: F32, imatrix: true}]")["gguf-F32-imatrix"]
            for t in types:
                path = Path(tmp) / f"llama-cpp-{t}.gguf"
                run([args.tools / "llama-quantize", "--imatrix", f32.with_name(f32.stem + ".imatrix.gguf"), f32,
                     path, t, args.threads])
                files[f"{t} (llama.cpp)"] = path
        targets = {t: tensor_bytes(files[f"{t} (quantfab)"]) * 8 / model.parameters for t in types}
        budgeted = build("[" + ", ".join(f"{{format: gguf, type: {t}, target_bits_per_weight: {targets[t]!r}}}"
                                          for t in types) + "]")
        for t in types:
            files[f"{t} budget {targets[t]:.4f}"] = budgeted[GGUFOptions(type=t, target_bits_per_weight=targets[t]).key]
        config, weights = materialize(store, model.files).config(), materialize(store, model.files).weights()
        ids = validate_mod.eval_windows(model, base.validate_, store)
        metrics = validate_mod.compare(config, {"fp32": weights, **{k: GGUFTensors(p, config) for k, p in files.items()}},
                                       ids, "cpu")
        print(f"\nmodel {base.model.source}: {model.parameters:,} parameters; FP32 PPL "
              f"{metrics['baseline_perplexity']:.2f} on {metrics['tokens']} tokens")
        print("\n| build | tensor bits/weight | file bits/weight | PPL | KL (nats/token) | top-1 |\n|---|---|---|---|---|---|")
        for name, path in files.items():
            m = metrics["outputs"][name]
            print(f"| {name} | {tensor_bytes(path) * 8 / model.parameters:.4f} | "
                  f"{path.stat().st_size * 8 / model.parameters:.4f} | {m['perplexity']:.3f} | {m['kl_divergence']:.5f} "
                  f"| {m['top1_agreement'] * 100:.2f} % |", flush=True)
        for t in types:
            fixed, searched = metrics["outputs"][f"{t} (quantfab)"], metrics["outputs"][f"{t} budget {targets[t]:.4f}"]
            print(f"{t}: searched mix KL / fixed mix KL = {searched['kl_divergence'] / fixed['kl_divergence']:.3f}")


def tensor_bytes(path: Path) -> int:
    """The file's tensor data bytes (what llama.cpp's BPW counts)."""
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def run(command: list) -> None:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{command[0]} failed ({done.returncode}): {done.stderr[-1500:]}")


if __name__ == "__main__":
    main()
