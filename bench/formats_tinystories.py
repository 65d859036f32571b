"""Every serving format on TinyStories-656K: quality measured from the written files, and bits per weight.

Runs the stage functions (what the flow's tasks call) on recipes/tinystories-656k-q4_0.yaml as it stands
(64 x 256 TinyStories calibration tokens, 16,384-token WikiText-2 validation), one build per method, and
prints a markdown table. The consumer column says which real reader loads each format in tests/test_formats.py.

    python bench/formats_tinystories.py [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks import calibrate as calibrate_mod
from quantfab.tasks import download as download_mod
from quantfab.tasks import validate as validate_mod
from quantfab.tasks.convert.stage import convert
from quantfab.tasks.quantize.stage import quantize
from quantfab.tasks.store import Store

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tinystories-656k-q4_0.yaml"
W8A8 = "{format: compressed-tensors, type: int8, activations: int8}"
STATIC = ("{format: compressed-tensors, type: fp8, activation_scales: static}, "
          "{format: compressed-tensors, type: int8, activations: int8, activation_scales: static}")
KV = "{format: compressed-tensors, type: fp8, kv_cache: fp8}"
BLOCK = "{format: compressed-tensors, type: fp8, group_size: 128x128}"
FP4 = "{compressed-tensors: nvfp4}, {format: compressed-tensors, type: nvfp4, activations: float}, {compressed-tensors: mxfp4}"
SMOOTH = "quantize.smoothquant={alpha: 0.8}"
BUILDS = {  # label -> recipe overrides (method and options), outputs
    "gptq": (["quantize.method=gptq"], "[{compressed-tensors: int4}, {gptq: int4}, {gguf: Q4_0}, {gguf: Q4_K_M}, {mlx: int4}, "
             f"{{compressed-tensors: fp8}}, {W8A8}, {STATIC}, {KV}, {BLOCK}, {FP4}]"),
    "gptq, smoothquant 0.8": (["quantize.method=gptq", SMOOTH], f"[{W8A8}, {STATIC}]"),
    "awq": (["quantize.method=awq"], "[{awq: int4}, {compressed-tensors: int4}, {gguf: Q4_0}, {gguf: Q4_K_M}, {mlx: int4}]"),
    "rtn": (["quantize.method=rtn"], "[{compressed-tensors: int8}, {compressed-tensors: int4}, {gguf: Q8_0}, "
            f"{{gguf: Q4_0}}, {{mlx: int4}}, {{mlx: int8}}, {{compressed-tensors: fp8}}, {W8A8}, {STATIC}, {KV}, {BLOCK}, {FP4}]"),
    "rtn, smoothquant 0.8": (["quantize.method=rtn", SMOOTH], f"[{W8A8}, {STATIC}]"),
    "nf4": (["quantize.method=nf4"], "[{bnb-nf4: nf4}]"),
    "nf4, double quant": (["quantize.method=nf4", "quantize.nf4.double_quant=true"], "[{bnb-nf4: nf4}]"),
}
CONSUMERS = {"compressed-tensors": "transformers + compressed-tensors 0.20 (asymmetric: compressed-tensors' decompressor)",
             "gptq": "transformers + gptqmodel 7.6 (bench/consumers); v1 layout decoder (tests)",
             "awq": "transformers + gptqmodel 7.6 (bench/consumers); GEMM layout decoder (tests)",
             "bnb-nf4": "transformers + bitsandbytes (CPU)", "gguf": "gguf-py GGUFReader + quants.dequantize; llama.cpp 0.3.36 (pytest -m llama_cpp)",
             "mlx": "mlx-lm 0.32.2 (pytest -m mlx)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        for label, (sets, outputs) in BUILDS.items():
            r = load_recipe(RECIPE, [*sets, f"outputs={outputs}"])
            t = time.perf_counter()
            model = download_mod.download(r.model.source, None, r.model.include, False, store)
            cal = calibrate_mod.calibrate(model, r.calibration.source, r.calibration.samples, r.calibration.seq_len,
                                          r.calibration.seed, r.calibration.text_field, "cpu", store)
            quantized = quantize(model, cal, r.quantize, r.outputs, "cpu", store)
            converted = convert(model, quantized, r.outputs, r.name, store, cal)
            metrics = validate_mod.measure(model, converted, r.outputs, r.validate_, "cpu", store)
            for o in r.outputs:
                m = metrics["outputs"][o.key]
                rows.append((o.key, label, CONSUMERS[o.format], converted.files[o.key].bits_per_weight, m["perplexity"],
                             m["ppl_increase"], m["kl_divergence"], m["top1_agreement"]))
            print(f"{label}: {time.perf_counter() - t:.0f} s; FP32 PPL {metrics['baseline_perplexity']:.2f} on "
                  f"{metrics['tokens']} tokens", flush=True)
    print("\n| output | method | loaded by | bits/weight | PPL | Δ PPL | KL (nats/token) | top-1 |\n|---|---|---|---|---|---|---|---|")
    for key, label, consumer, bpw, ppl, rise, kl, top1 in rows:
        print(f"| {key} | {label} | {consumer} | {bpw:.3f} | {ppl:.2f} | {rise * 100:+.2f} % | {kl:.5f} | {top1 * 100:.2f} % |")


if __name__ == "__main__":
    main()
