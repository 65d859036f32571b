"""Peer side of the quantfab benchmark: llm-compressor 0.14 `oneshot` on the CPU.

Run in its own venv (see bench/peer/README.md):

    /work/peer-venv/bin/python bench/peer/run_llmcompressor.py tinystories   # quality table, ~10-20 min
    /work/peer-venv/bin/python bench/peer/run_llmcompressor.py synthetic     # timing, 8x1024 Llama
    /work/peer-venv/bin/python bench/peer/run_llmcompressor.py all

Every scheme starts from a fresh copy of the fp32 model, targets every nn.Linear except lm_head
(embeddings are tied and stay fp32), and uses
``QuantizationArgs(num_bits=4, type="int", symmetric=..., strategy="group", group_size=...)``
in ``config_groups``. Everything else is llm-compressor's default (recorded in the JSON under
"defaults").

What is evaluated: after `oneshot`, each quantized Linear holds ``weight`` (GPTQ: already the
quantize-dequantized values; RTN / AWQ: the fp32 (AWQ: scaled) weight, quantized on the fly by the
compressed-tensors forward wrapper), ``weight_scale`` and ``weight_zero_point``. We compute the
effective weight ``fake_quantize(weight, weight_scale, weight_zero_point, args)`` ourselves, check
it (it differs from the original weight, and every group has <= 16 distinct values), copy it and
every other parameter (AWQ rescales the RMSNorm / v_proj / up_proj weights) into a plain fp32
LlamaForCausalLM, and score that plain model with protocol.evaluate. As a cross-check the model
returned by oneshot (with its quantized-forward wrappers) is also scored; the two PPLs must agree.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")  # its per-module METRIC lines are many
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import protocol as P  # noqa: E402

DATA = Path(os.environ.get("QUANTFAB_DATA", HERE.parents[2] / "shared" / "data"))
if not (DATA / "tinystories-656k").is_dir():
    DATA = Path("/work/shared/data")
MODEL_DIR = DATA / "tinystories-656k"
TEXT = DATA / "tinystories-valid-head.txt"
SYN_DIR = Path(os.environ.get("BENCH_CACHE", "/work/bench-cache")) / "synthetic-8x1024"

# name -> (method, symmetric, group_size)
SCHEMES = {
    "rtn-g32-asym": ("rtn", False, 32),
    "gptq-g32-asym": ("gptq", False, 32),
    "awq-g32-asym": ("awq", False, 32),
    "gptq-g128-sym": ("gptq", True, 128),
    "rtn-g32-sym": ("rtn", True, 32),
    "rtn-g128-asym": ("rtn", False, 128),
    "rtn-g128-sym": ("rtn", True, 128),
    "gptq-g32-sym": ("gptq", True, 32),
    "gptq-g128-asym": ("gptq", False, 128),
    "awq-g128-asym": ("awq", False, 128),
    "awq-g128-sym": ("awq", True, 128),
    "awq-g32-sym": ("awq", True, 32),
}
# schemes that quantize activations too: name -> (method, llm-compressor preset, SmoothQuant strength or None).
# Their activations are quantized at run time by compressed-tensors' forward wrapper, so oneshot's own model
# (wrappers on) is what is scored.
ACTIVATION_SCHEMES = {
    "fp8-dynamic": ("rtn", "FP8_DYNAMIC", None),
    "gptq-fp8-dynamic": ("gptq", "FP8_DYNAMIC", None),
    "w8a8": ("rtn", "W8A8", None),
    "gptq-w8a8": ("gptq", "W8A8", None),
    "sq-w8a8": ("rtn", "W8A8", 0.8),
    "sq-gptq-w8a8": ("gptq", "W8A8", 0.8),  # llm-compressor's own W8A8 example: SmoothQuant 0.8, then GPTQ
    # static: weights per channel as above, one calibrated input scale per Linear (not presets: FP8's preset scales
    # weights per tensor)
    "fp8-static": ("rtn", "float-static", None), "gptq-fp8-static": ("gptq", "float-static", None),
    "w8a8-static": ("rtn", "int-static", None), "sq-gptq-w8a8-static": ("gptq", "int-static", 0.8),
    "fp8-block": ("rtn", "FP8_BLOCK", None), "gptq-fp8-block": ("gptq", "FP8_BLOCK", None),
    "nvfp4": ("rtn", "NVFP4", None), "gptq-nvfp4": ("gptq", "NVFP4", None),
    "nvfp4a16": ("rtn", "NVFP4A16", None), "gptq-nvfp4a16": ("gptq", "NVFP4A16", None),
    "mxfp4a16": ("rtn", "MXFP4A16", None), "gptq-mxfp4a16": ("gptq", "MXFP4A16", None),
}
# the same with an FP8 KV cache (kv_cache_scheme: per-tensor static k/v scales), name -> the scheme it extends
KV_SCHEMES = {"fp8-dynamic-kvfp8": "fp8-dynamic", "gptq-fp8-dynamic-kvfp8": "gptq-fp8-dynamic"}
# the lead's reference figures (ppl, kl) under this protocol
REFERENCE = {
    "fp32": (30.968, 0.0),
    "rtn-g32-asym": (32.080, 0.0509),
    "gptq-g32-asym": (31.851, 0.0316),
    "awq-g32-asym": (31.782, 0.0455),
    "gptq-g128-sym": (32.887, 0.0614),
}


# ---------------------------------------------------------------------------------------------
# CPU patch for AWQ. llmcompressor/modifiers/transform/awq/base.py, AWQModifier._apply_smoothing,
# calls `cache.pin_memory(batch_index)` (IntermediatesCache.pin_memory in
# llmcompressor/pipelines/cache.py) for every cached batch before the grid search; pinning needs
# an accelerator and raises on a CPU-only torch. Pinning only speeds up host->device copies, so on
# the CPU it is replaced by a no-op. Patched on the class, so it applies wherever it is called.
def patch_pin_memory_for_cpu() -> None:
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available():
        return

    def _no_pin(self, batch_index, input_names=None):  # noqa: ARG001
        return None

    IntermediatesCache.pin_memory = _no_pin


def versions() -> dict:
    import compressed_tensors
    import llmcompressor
    import transformers

    try:
        import datasets
        dv = datasets.__version__
    except Exception:  # pragma: no cover
        dv = None
    return {
        "llmcompressor": llmcompressor.__version__,
        "compressed-tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "datasets": dv,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def make_recipe(method: str, symmetric: bool, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    def groups():
        return {
            "group_0": QuantizationScheme(
                targets=["Linear"],
                weights=QuantizationArgs(
                    num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size
                ),
            )
        }

    if method == "rtn":
        return [QuantizationModifier(config_groups=groups(), ignore=["lm_head"])]
    if method == "gptq":
        return [GPTQModifier(config_groups=groups(), ignore=["lm_head"])]
    if method == "awq":
        # 0.14 API: AWQ is a transform, paired with the quantization modifier that it smooths for
        return [AWQModifier(), QuantizationModifier(config_groups=groups(), ignore=["lm_head"])]
    raise ValueError(method)


def make_activation_recipe(method: str, preset: str, smoothing: float | None, kv: bool = False):
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    modifier = GPTQModifier if method == "gptq" else QuantizationModifier
    if preset.endswith("-static"):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        kind = preset.removesuffix("-static")
        scheme = QuantizationScheme(
            targets=["Linear"], weights=QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="channel"),
            input_activations=QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="tensor", dynamic=False))
        quantize = modifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    else:
        from compressed_tensors.quantization import QuantizationArgs

        kv_args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False)
        quantize = modifier(targets="Linear", scheme=preset, ignore=["lm_head"], kv_cache_scheme=kv_args if kv else None)
    return ([SmoothQuantModifier(smoothing_strength=smoothing)] if smoothing is not None else []) + [quantize]


def observed_defaults() -> dict:
    """Defaults of the modifiers as constructed above (read from the objects, not hoped)."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.args import DatasetArguments

    g = GPTQModifier(config_groups=make_recipe("gptq", True, 128)[0].config_groups, ignore=["lm_head"])
    resolved = g.resolve_quantization_config().config_groups["group_0"].weights
    a = AWQModifier()
    d = DatasetArguments()
    return {
        "gptq": {
            "dampening_frac": g.dampening_frac,
            "block_size": g.block_size,
            "actorder_modifier_default": str(g.actorder),
            "actorder_resolved": str(resolved.actorder),
            "batched_quantization": g.batched_quantization,
            "weight_observer": resolved.observer or "None -> memoryless_minmax",
            "note": "scales/zero-points come from the observer on the weights before the GPTQ "
                    "update and stay fixed (not recomputed per group during GPTQ)",
        },
        "awq": {
            "n_grid": a.n_grid,
            "duo_scaling": a.duo_scaling,
            "mappings": "default (Llama: input_layernorm->q/k/v, v_proj->o_proj, "
                        "post_attention_layernorm->gate/up, up_proj->down_proj)",
            "clip_search": "none (0.14 AWQModifier has no clipping search; weight observer is "
                           "memoryless min-max)",
            "offload_device": str(a.offload_device),
        },
        "rtn": {"weight_observer": "memoryless_minmax (QuantizationArgs.observer=None)"},
        "oneshot": {
            "pipeline": d.pipeline,
            "batch_size": d.batch_size,
            "propagate_error": d.propagate_error,
            "shuffle_calibration_samples": "False (set here; default True)",
        },
    }


def calib_dataset(rows: np.ndarray):
    from datasets import Dataset

    rows = np.asarray(rows, dtype=np.int64)
    return Dataset.from_dict(
        {"input_ids": rows.tolist(), "attention_mask": np.ones_like(rows).tolist()}
    )


def run_oneshot(model, tokenizer, rows: np.ndarray, recipe) -> float:
    """oneshot on the CPU; returns the wall seconds of the oneshot call alone."""
    from llmcompressor import oneshot

    ds = calib_dataset(rows)
    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=int(rows.shape[0]),
        max_seq_length=int(rows.shape[1]),
        shuffle_calibration_samples=False,
    )
    return time.perf_counter() - t0


def effective_state(qmodel, group_size: int, original: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Plain state dict whose Linear weights are the dequantized values; plus checks."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state: dict[str, torch.Tensor] = {}
    checks = {"quantized_linears": 0, "max_distinct_per_group": 0, "all_changed": True}
    qnames = set()
    with torch.no_grad():
        for name, mod in qmodel.named_modules():
            scheme = getattr(mod, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or not hasattr(mod, "weight_scale"):
                continue
            args = scheme.weights
            w = mod.weight.detach().float()
            zp = getattr(mod, "weight_zero_point", None)
            assert getattr(mod, "weight_g_idx", None) is None, "g_idx (group actorder) not expected"
            deq = fake_quantize(w, mod.weight_scale, zp, args).float()
            out_f, in_f = deq.shape
            grp = deq.reshape(out_f, in_f // group_size, group_size)
            srt = grp.sort(dim=-1).values
            distinct = (srt[..., 1:] != srt[..., :-1]).sum(-1) + 1
            checks["max_distinct_per_group"] = max(checks["max_distinct_per_group"], int(distinct.max()))
            key = name + ".weight"
            changed = not torch.equal(deq, original[key])
            checks["all_changed"] = checks["all_changed"] and changed
            checks["quantized_linears"] += 1
            state[key] = deq
            qnames.add(key)
        for k, v in qmodel.state_dict().items():
            if k in qnames or k.endswith(("weight_scale", "weight_zero_point", "weight_g_idx",
                                          "weight_global_scale")):
                continue
            state[k] = v.detach().float().clone()
    return state, checks


def stored_vs_effective(qmodel) -> float:
    """max |module.weight - fake_quantize(module.weight)| over quantized Linears (0 for GPTQ)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    m = 0.0
    with torch.no_grad():
        for mod in qmodel.modules():
            scheme = getattr(mod, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or not hasattr(mod, "weight_scale"):
                continue
            w = mod.weight.detach().float()
            deq = fake_quantize(w, mod.weight_scale, getattr(mod, "weight_zero_point", None), scheme.weights)
            m = max(m, (deq.float() - w).abs().max().item())
    return m


def load_fp32(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------
def part_tinystories(args, on_result=None) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    chunks = P.eval_chunks(tok, TEXT)
    rows = P.calibration_rows(tok, TEXT, text_per_row=args.text_per_row)
    base = load_fp32(MODEL_DIR)
    original = {k: v.detach().clone() for k, v in base.state_dict().items()}
    t0 = time.perf_counter()
    ref = P.fp32_logprobs(base, chunks)
    print(f"fp32 PPL {ref.ppl:.6f} over {ref.tokens} tokens ({time.perf_counter() - t0:.1f} s); "
          f"calibration rows {rows.shape} (BOS + {args.text_per_row} text tokens), "
          f"digest {P.tokens_digest(rows)}", flush=True)

    names = args.schemes or list(SCHEMES)
    results: dict[str, dict] = {}
    head = {"fp32_ppl": ref.ppl, "results": results, "rows_shape": list(rows.shape),
            "rows_digest": P.tokens_digest(rows), "eval_digest": P.tokens_digest(chunks)}
    crosschecked: set[str] = set()
    for name in names:
        if name in ACTIVATION_SCHEMES or name in KV_SCHEMES:
            method, preset, smoothing = ACTIVATION_SCHEMES[KV_SCHEMES.get(name, name)]
            model = copy.deepcopy(base)
            secs = run_oneshot(model, tok, rows, make_activation_recipe(method, preset, smoothing, name in KV_SCHEMES))
            r = P.evaluate(model, chunks, reference=ref)  # the wrapped model: weights and inputs quantized
            results[name] = {"method": method, "preset": preset, "smoothing_strength": smoothing, "ppl": r["ppl"],
                             "kl": r["kl"], "top1": r["top1"], "seconds": secs, "scored": "oneshot's wrapped model"}
            print(f"{name:15s} PPL {r['ppl']:8.4f}  KL {r['kl']:.5f}  top1 {r['top1']:.4f}  oneshot {secs:7.2f} s",
                  flush=True)
            del model
            if on_result:
                on_result(head)
            continue
        method, sym, gs = SCHEMES[name]
        model = copy.deepcopy(base)  # fresh fp32 copy
        try:
            recipe = make_recipe(method, sym, gs)
            secs = run_oneshot(model, tok, rows, recipe)
        except Exception as e:  # keep going: a scheme that does not run is recorded as such
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            if on_result:
                on_result(head)
            continue
        state, checks = effective_state(model, gs, original)
        checks["stored_weight_vs_effective_max_abs"] = stored_vs_effective(model)
        plain = copy.deepcopy(base)
        missing, unexpected = plain.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert all(k == "lm_head.weight" for k in missing), missing
        assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
        assert torch.equal(plain.model.embed_tokens.weight, original["model.embed_tokens.weight"])
        r = P.evaluate(plain, chunks, reference=ref)
        # cross-check: oneshot's own model, quantized-forward wrappers on (once per method by default)
        wrapped = None
        if args.crosscheck == "all" or (args.crosscheck == "first" and method not in crosschecked):
            wrapped = P.evaluate(model, chunks)
            crosschecked.add(method)
        res = {"method": method, "symmetric": sym, "group_size": gs, "ppl": r["ppl"], "kl": r["kl"],
               "top1": r["top1"], "seconds": secs, "ppl_oneshot_model": wrapped["ppl"] if wrapped else None, "checks": checks}
        results[name] = res
        ok = checks["max_distinct_per_group"] <= 16 and checks["all_changed"]
        print(f"{name:15s} PPL {r['ppl']:8.4f}  KL {r['kl']:.5f}  top1 {r['top1']:.4f}  "
              f"oneshot {secs:7.2f} s  | oneshot-model PPL {wrapped['ppl'] if wrapped else float('nan'):.4f}  "
              f"linears {checks['quantized_linears']} distinct<= {checks['max_distinct_per_group']} "
              f"changed {checks['all_changed']} stored-vs-qdq {checks['stored_weight_vs_effective_max_abs']:.2e}"
              f"{'' if ok else '  CHECK FAILED'}", flush=True)
        del model, plain, state
        if on_result:
            on_result(head)
    return head


def print_table(res: dict) -> str:
    lines = [f"FP32 PPL {res['fp32_ppl']:.4f}", "",
             "| scheme | PPL | KL (nats) | top-1 | oneshot s | lead's PPL / KL |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in res["results"].items():
        refs = REFERENCE.get(name)
        rs = f"{refs[0]:.3f} / {refs[1]:.4f}" if refs else ""
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:60]} | | | | {rs} |")
        else:
            lines.append(f"| {name} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.4f} | "
                         f"{r['seconds']:.2f} | {rs} |")
    s = "\n".join(lines)
    print(s, flush=True)
    return s


# ---------------------------------------------------------------------------------------------
SYN_CFG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=32000, initializer_range=0.02)


def build_synthetic(out_dir: Path) -> np.ndarray:
    """Create (or reuse) the synthetic model + calib.safetensors; returns the calibration rows."""
    from safetensors.numpy import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    calib_path = out_dir / "calib.safetensors"
    if (out_dir / "config.json").is_file() and calib_path.is_file():
        return load_file(str(calib_path))["input_ids"]
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(**SYN_CFG)
    model = LlamaForCausalLM(cfg).eval()
    kw = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kw["safe_serialization"] = True
    model.save_pretrained(str(out_dir), **kw)
    rows = np.random.default_rng(0).integers(0, SYN_CFG["vocab_size"], size=(64, 256), dtype=np.int64)
    save_file({"input_ids": rows}, str(calib_path))
    return rows


def part_synthetic(args) -> dict:
    from transformers import AutoConfig

    rows = build_synthetic(SYN_DIR)
    cfg = AutoConfig.from_pretrained(str(SYN_DIR))
    out = {"model_dir": str(SYN_DIR), "config": SYN_CFG, "tie_word_embeddings": bool(cfg.tie_word_embeddings),
           "seed": "torch.manual_seed(0) then LlamaForCausalLM(config), fp32",
           "calib": "np.random.default_rng(0).integers(0, 32000, size=(64, 256)) int64, no BOS, "
                    "saved as calib.safetensors key input_ids",
           "threads": torch.get_num_threads(), "device": "cpu", "calib_shape": list(rows.shape),
           "calib_digest": P.tokens_digest(rows), "versions": versions(), "defaults": observed_defaults(),
           "results": {}}
    path = HERE / "results-synthetic.json"
    # oneshot insists on a processor when given a dataset, although the rows are already token ids and
    # it tokenizes nothing; the synthetic model has none, so the TinyStories tokenizer stands in
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    out["processor"] = "TinyStories-656K tokenizer object (unused: the dataset is input_ids)"
    for name in args.syn_schemes:
        method, sym, gs = SCHEMES[name]
        model = load_fp32(SYN_DIR)
        secs = run_oneshot(model, tok, rows, make_recipe(method, sym, gs))
        out["results"][name] = {"method": method, "symmetric": sym, "group_size": gs, "seconds": secs}
        print(f"synthetic {name}: oneshot {secs:.1f} s (torch threads {torch.get_num_threads()})", flush=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["tinystories", "synthetic", "all"])
    ap.add_argument("--schemes", nargs="*", choices=[*SCHEMES, *ACTIVATION_SCHEMES, *KV_SCHEMES], default=None)
    ap.add_argument("--text-per-row", type=int, default=P.CALIB_TEXT,
                    help="text tokens per calibration row after the BOS (protocol: 256)")
    ap.add_argument("--crosscheck", choices=["all", "first", "none"], default="first",
                    help="also score oneshot's own (wrapped) model: for every scheme, the first of "
                         "each method, or never")
    ap.add_argument("--out", default=None, help="JSON path for the tinystories part")
    ap.add_argument("--syn-schemes", nargs="*", default=["gptq-g128-sym", "awq-g128-asym"])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (both parts)")
    args = ap.parse_args()

    patch_pin_memory_for_cpu()
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("PEER_LOG_LEVEL", "WARNING"))
    # llm-compressor may write logs relative to the cwd: keep them out of the repo
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "peer-llmcompressor"
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)

    torch.set_num_threads(args.threads)
    if args.part in ("tinystories", "all"):
        out = Path(args.out) if args.out else HERE / "results-tinystories.json"
        meta = {"versions": versions(), "defaults": observed_defaults()}

        def write(res: dict, final: bool = False) -> None:
            table = print_table(res) if final else None
            doc = {"protocol": {"eval_tokens": P.EVAL_TOKENS, "eval_chunk": P.EVAL_CHUNK, "bos": P.BOS_ID,
                                "calibration": f"{res['rows_shape'][0]} rows x {res['rows_shape'][1]} = BOS + "
                                               f"{args.text_per_row} text tokens, the last "
                                               f"{res['rows_shape'][0] * args.text_per_row} text tokens",
                                "torch_threads": torch.get_num_threads(), "device": "cpu"},
                   "complete": final, "fp32_ppl": res["fp32_ppl"], **meta,
                   "rows_digest": res["rows_digest"], "eval_digest": res["eval_digest"],
                   "reference_lead": {k: {"ppl": v[0], "kl": v[1]} for k, v in REFERENCE.items()},
                   "schemes": res["results"], "table_md": table}
            out.write_text(json.dumps(doc, indent=2) + "\n")

        res = part_tinystories(args, on_result=write)
        write(res, final=True)
        print(f"wrote {out}")
    if args.part in ("synthetic", "all"):
        part_synthetic(args)
        print(f"wrote {HERE / 'results-synthetic.json'}")


if __name__ == "__main__":
    main()
