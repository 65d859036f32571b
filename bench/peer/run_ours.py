"""Our side of the llm-compressor comparison: the same tokens, the same calibration rows, the same evaluator.

Runs in quantfab's own venv. Our builds go through quantfab's quantize code (tasks/trial.py); their decoded
weights are loaded into the HF model and scored by protocol.evaluate, exactly as run_llmcompressor.py scores
the peer's. Prints ours beside theirs (results-tinystories.json, from run_llmcompressor.py) with ratios.

    python bench/peer/run_ours.py [--data ../shared/data] [--peer bench/peer/results-tinystories.json]
    python bench/peer/run_ours.py --synthetic      # quantize-stage time on the 8 x 1024 synthetic Llama
    python bench/peer/run_ours.py --device cuda    # either, with calibration and the methods on the GPU

For the timing comparison, pin both sides to one core the same way, e.g. `taskset -c 0 ... --threads 1`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402

from quantfab.pipelines.recipe import QuantizeSpec, SmoothQuantSpec  # noqa: E402
from quantfab.tasks.activations import InputQuant, MeasuredScales, simulate_inputs, simulate_kv_cache  # noqa: E402
from quantfab.tasks.calibrate import calibrate_on  # noqa: E402
from quantfab.tasks.store import Store  # noqa: E402
from quantfab.tasks.trial import Trial  # noqa: E402

SCHEMES = {  # peer scheme name -> (our method, our grid)
    "rtn-g32-asym": ("rtn", "INT4_G32_ASYM"), "gptq-g32-asym": ("gptq", "INT4_G32_ASYM"),
    "awq-g32-asym": ("awq", "INT4_G32_ASYM"), "gptq-g128-sym": ("gptq", "INT4_G128_SYM"),
    "rtn-g32-sym": ("rtn", "INT4_G32_SYM"), "rtn-g128-sym": ("rtn", "INT4_G128_SYM"),
    "rtn-g128-asym": ("rtn", "INT4_G128_ASYM"), "gptq-g32-sym": ("gptq", "INT4_G32_SYM"),
    "gptq-g128-asym": ("gptq", "INT4_G128_ASYM"), "awq-g32-sym": ("awq", "INT4_G32_SYM"),
    "awq-g128-sym": ("awq", "INT4_G128_SYM"), "awq-g128-asym": ("awq", "INT4_G128_ASYM"),
    "rtn-g64-sym": ("rtn", "INT4_G64_SYM"), "nf4-b64": ("nf4", "NF4_B64"), "nf4-b64-dq": ("nf4", "NF4_B64_DQ"),  # no peer row: bitsandbytes' grid
}

# schemes that quantize activations too: name -> (method, grid, activations.SCHEMES name, SmoothQuant alpha or None);
# the inputs are quantized by the hooks validate uses, as compressed-tensors' forward wrapper does on the peer side
ACTIVATION_SCHEMES = {
    "fp8-dynamic": ("rtn", "FP8_CH", "fp8-token", None), "gptq-fp8-dynamic": ("gptq", "FP8_CH", "fp8-token", None),
    "w8a8": ("rtn", "INT8_CH_SYM", "int8-token", None), "gptq-w8a8": ("gptq", "INT8_CH_SYM", "int8-token", None),
    "sq-w8a8": ("rtn", "INT8_CH_SYM", "int8-token", 0.8), "sq-gptq-w8a8": ("gptq", "INT8_CH_SYM", "int8-token", 0.8),
    # static: one scale per Linear input, its calibrated range over the type's half range, as the format stores it
    "fp8-static": ("rtn", "FP8_CH", "fp8-tensor", None), "gptq-fp8-static": ("gptq", "FP8_CH", "fp8-tensor", None),
    "w8a8-static": ("rtn", "INT8_CH_SYM", "int8-tensor", None),
    "sq-gptq-w8a8-static": ("gptq", "INT8_CH_SYM", "int8-tensor", 0.8),
    "fp8-block": ("rtn", "FP8_B128", "fp8-group128", None), "gptq-fp8-block": ("gptq", "FP8_B128", "fp8-group128", None),
    "nvfp4": ("rtn", "NVFP4", "nvfp4-group16", None), "gptq-nvfp4": ("gptq", "NVFP4", "nvfp4-group16", None),
    "nvfp4a16": ("rtn", "NVFP4", None, None), "gptq-nvfp4a16": ("gptq", "NVFP4", None, None),
    "mxfp4a16": ("rtn", "MXFP4", None, None), "gptq-mxfp4a16": ("gptq", "MXFP4", None, None),
}
KV_SCHEMES = {"fp8-dynamic-kvfp8": "fp8-dynamic", "gptq-fp8-dynamic-kvfp8": "gptq-fp8-dynamic"}  # + an FP8 KV cache
STATIC = {"fp8-tensor": "fp8", "int8-tensor": "int8", "nvfp4-group16": "nvfp4"}  # input scheme -> the scale kind quantize measures

SYN_DIR = Path(os.environ.get("BENCH_CACHE", "/work/bench-cache")) / "synthetic-8x1024"


def synthetic(peer_path: Path, schemes: list[str], device: str) -> dict:
    """Quantize-stage wall time (calibration + method) on the model and rows run_llmcompressor.py saved.

    The peer's oneshot time holds its own calibration passes and its method, so ours is the same sum:
    what the calibrate stage runs for the recipe (the unquantized statistics, or only the token windows
    when every Linear is on a sequential method, which measures its own inputs) plus the method over
    every layer, the download excluded.
    """
    from safetensors.numpy import load_file

    from quantfab.tasks.quantize import METHODS

    if not (SYN_DIR / "calib.safetensors").is_file():  # e.g. on a GPU machine: the peer side's seeded build
        import run_llmcompressor  # its llm-compressor imports are inside the functions that run oneshot

        run_llmcompressor.build_synthetic(SYN_DIR)
    rows = load_file(str(SYN_DIR / "calib.safetensors"))["input_ids"]
    peer = json.loads(peer_path.read_text())["results"] if peer_path.is_file() else {}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        needed = sorted({not METHODS[SCHEMES[s][0]].sequential for s in schemes})
        trial = Trial(SYN_DIR, Store(tmp), rows, eval_ids=rows[:1], device=device, statistics=needed[-1])
        calibrate_s = {}
        for statistics in needed:
            t = time.perf_counter()
            calibrate_on(trial.model, rows, device, trial.store, statistics)
            calibrate_s[statistics] = time.perf_counter() - t
        print(f"synthetic 8 x 1024, calibration {rows.shape[0]} x {rows.shape[1]}: calibrate "
              + ", ".join(f"{v:.1f} s {'with statistics' if k else 'token windows only'}" for k, v in calibrate_s.items())
              + f"; torch threads {torch.get_num_threads()}; device {device_name(device)}")
        print(f"{'scheme':<15} {'calib s':>8} {'method s':>9} {'ours s':>8} {'peer s':>8} {'ours/peer':>10}")
        for scheme in schemes:
            method, grid = SCHEMES[scheme]
            calib = calibrate_s[not METHODS[method].sequential]
            t = time.perf_counter()
            trial.layer_files(QuantizeSpec(method=method), grid)
            method_s = time.perf_counter() - t
            ours = calib + method_s
            theirs = (peer.get(scheme) or {}).get("seconds")
            results[scheme] = {"calibrate_s": calib, "method_s": method_s, "seconds": ours, "peer_seconds": theirs,
                               "ratio": ours / theirs if theirs else None}
            print(f"{scheme:<15} {calib:8.1f} {method_s:9.1f} {ours:8.1f} {theirs or float('nan'):8.1f} "
                  f"{ours / theirs if theirs else float('nan'):10.3f}", flush=True)
    return {"calib_shape": list(rows.shape), "torch_threads": torch.get_num_threads(), "device": device_name(device),
            "schemes": results}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("QUANTFAB_DATA", "../shared/data")))
    ap.add_argument("--peer", type=Path, default=Path(__file__).resolve().parent / "results-tinystories.json")
    ap.add_argument("--out", type=Path, help="also write our figures here as JSON")
    ap.add_argument("--schemes", nargs="*", default=None, choices=[*SCHEMES, *ACTIVATION_SCHEMES, *KV_SCHEMES],
                    metavar="SCHEME")
    ap.add_argument("--synthetic", action="store_true", help="time the quantize stage on the synthetic 8 x 1024 Llama")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where calibration and the methods run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.synthetic:
        out = synthetic(Path(__file__).resolve().parent / "results-synthetic.json",
                        args.schemes or ["gptq-g128-sym", "awq-g128-asym"], args.device)
        if args.out:
            args.out.write_text(json.dumps(out, indent=2) + "\n")
        return
    args.schemes = args.schemes or list(SCHEMES)
    model_dir, text = args.data / "tinystories-656k", args.data / "tinystories-valid-head.txt"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chunks = protocol.eval_chunks(tokenizer, text)
    rows = protocol.calibration_rows(tokenizer, text)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference = protocol.fp32_logprobs(hf, chunks)
    peer = json.loads(args.peer.read_text())["schemes"] if args.peer.is_file() else {}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        trial = Trial(model_dir, Store(tmp), rows, eval_ids=rows[:1], device=args.device)  # scored by protocol.evaluate
        calibrate_s = time.perf_counter() - t
        print(f"FP32 PPL {protocol.evaluate(hf, chunks)['ppl']:.3f}; calibration {calibrate_s:.1f} s (shared by all)")
        print(f"{'scheme':<15} {'PPL ours':>9} {'PPL peer':>9} {'KL ours':>8} {'KL peer':>8} {'KL o/p':>7} "
              f"{'s ours':>7} {'s peer':>7} {'s o/p':>6}")
        for scheme in args.schemes:
            kv = "fp8" if scheme in KV_SCHEMES else None
            method, grid, inputs, alpha = ACTIVATION_SCHEMES.get(KV_SCHEMES.get(scheme, scheme)) or \
                (*SCHEMES[scheme], None, None)
            quant = QuantizeSpec(method=method, smoothquant=None if alpha is None else SmoothQuantSpec(alpha=alpha))
            t = time.perf_counter()
            layers = trial.layer_files(quant, grid, MeasuredScales(STATIC.get(inputs), kv))
            seconds = time.perf_counter() - t
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            state = {}
            for lf in layers:
                state.update(lf.weights())
            kv_scales = {name: float(state.pop(name)[0]) for name in list(state) if name.endswith(("k_scale", "v_scale"))}
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected, unexpected
            for i, layer in enumerate(model.model.layers):  # keys and values through the FP8 cache, as validate does
                if f"model.layers.{i}.self_attn.k_scale" in kv_scales:
                    simulate_kv_cache(layer, "self_attn", kv_scales[f"model.layers.{i}.self_attn.k_scale"],
                                      kv_scales[f"model.layers.{i}.self_attn.v_scale"])
            if inputs:
                simulate_inputs(model, {r.name: InputQuant(inputs, r.input_scale) for lf in layers for r in lf.reports()
                                        if r.grid})
            ours = protocol.evaluate(model, chunks, reference)
            theirs = peer.get(scheme, {})
            results[scheme] = {"method": method, "grid": grid, "inputs": inputs, "smoothquant_alpha": alpha, "ppl": ours["ppl"], "kl": ours["kl"],
                               "top1": ours.get("top1"), "seconds": seconds, "kl_over_peer": ours["kl"] / theirs["kl"]
                               if theirs.get("kl") else None}
            ratio = lambda a, b: f"{a / b:.3f}" if b else "-"  # noqa: E731
            print(f"{scheme:<15} {ours['ppl']:9.3f} {theirs.get('ppl', float('nan')):9.3f} {ours['kl']:8.5f} "
                  f"{theirs.get('kl', float('nan')):8.5f} {ratio(ours['kl'], theirs.get('kl')):>7} {seconds:7.1f} "
                  f"{theirs.get('seconds', float('nan')):7.1f} {ratio(seconds, theirs.get('seconds')):>6}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"defaults": QuantizeSpec(method="gptq").model_dump(mode="json"),
                                        "torch_threads": torch.get_num_threads(), "device": device_name(args.device),
                                        "schemes": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
