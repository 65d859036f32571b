"""validate: measure what ships. Weights are decoded from the written files, never from memory.

The unquantized model and every decoded output run side by side, one decoder layer at a time, on
non-overlapping windows (BOS, then window - 1 text tokens). Metrics: perplexity of each, mean
KL(fp32 || quantized) per predicted token in nats, and top-1 agreement with the unquantized model. An output
whose runtime quantizes activations too (FP8, INT8 W8A8) runs with its Linears' inputs quantized the same way
(tasks/activations.py), and one with an FP8 KV cache with its attention's keys and values so stored; the report
says so.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from typing import Any

import numpy as np
import torch

from quantfab.tasks.activations import SCHEMES
from quantfab.tasks.convert import FORMATS
from quantfab.tasks.convert.differences import summary
from quantfab.tasks.download import materialize
from quantfab.tasks.manifests import ConvertManifest, ModelManifest, QuantizeManifest, QualityManifest
from quantfab.tasks.decoder import Decoder
from quantfab.tasks.forward import forward
from quantfab.tasks.eval_items import task_digest
from quantfab.tasks.evals import run_tasks
from quantfab.tasks.gates import GATES, TASK_GATES, judge_gate, standard_error_of
from quantfab.tasks.speed import REFERENCE, measure_speed
from quantfab.tasks.modelio import pick_device
from quantfab.tasks.store import Store
from quantfab.tasks.texts import bos_of, evaluation_tokens_read, evaluation_window_count, read_tokens, windows


def eval_windows(model: ModelManifest, spec, store: Store, text_sha256: str | None = None) -> np.ndarray:
    model_dir = materialize(store, model.files)
    config = model_dir.config()
    tokenizer = None if spec.source.startswith("synthetic://") else model_dir.tokenizer()
    ids = read_tokens(spec.source, tokenizer, config.vocab_size, evaluation_tokens_read(spec.tokens, spec.window),
                      spec.text_field, text_sha256)
    return windows(ids, spec.window, evaluation_window_count(spec.tokens, spec.window), bos_of(config), spec.source,
                   "validate")


def measure(model: ModelManifest, converted: ConvertManifest, outputs: list, spec, device: str, store: Store,
            task_digests: dict[str, str] | None = None, text_sha256: str | None = None) -> dict[str, Any]:
    """Metrics of the baseline and every output over the same tokens and task items, each decoded from its
    written file; ``task_digests`` and ``text_sha256`` (the stage's key) are the task files' and the evaluation
    text's expected sha256: a file edited since the key was computed is refused (task digests are read now if not
    given)."""
    model_dir = materialize(store, model.files)
    config, weights = model_dir.config(), model_dir.weights()
    sources: dict[str, Any] = {"fp32": weights}
    for o in outputs:
        f = converted.files[o.key]
        sources[o.key] = FORMATS[o.format].reader(materialize(store, f.files).path / f.path, config)
    ids = eval_windows(model, spec, store, text_sha256)
    metrics = compare(config, sources, ids, device)
    metrics["tokens_sha256"] = hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()
    for key, m in metrics["outputs"].items():
        m["simulated"] = served_as(sources[key])
    if spec.tasks:
        digests = task_digests or {t.label: task_digest(t.source) for t in spec.tasks}
        metrics["tasks"], per_output = run_tasks(config, model_dir.tokenizer(), sources, spec.tasks, digests,
                                                 bos_of(config), spec.tokens, pick_device(device))
        for key, m in metrics["outputs"].items():
            m["tasks"] = per_output[key]
    return metrics


def served_as(source: Any) -> list[str]:
    """What validate simulated beyond the stored weights, e.g. activations quantized as the runtime does."""
    if not hasattr(source, "input_schemes"):
        return []
    used = Counter(q.scheme for q in source.input_schemes("").values())
    kv = len(source.kv_cache(""))
    return [f"{SCHEMES[s][1]} ({n} Linears), as compressed-tensors computes them" for s, n in sorted(used.items())] + \
        ([f"keys and values cached as FP8 E4M3, one calibrated scale each per layer ({kv} layers)"] if kv else [])


@torch.no_grad()
def compare(config, sources: dict[str, Any], ids: np.ndarray, device: str) -> dict[str, Any]:
    """Run ``sources`` (name -> anything with ``load(names)``; "fp32" is the baseline) side by side, a layer at a time."""
    dev = pick_device(device)
    decoder, hidden = forward(config, sources, sources["fp32"], torch.from_numpy(ids), dev)
    return _metrics(decoder, sources, hidden, torch.from_numpy(ids))


LOGPROB_CHUNK = 1 << 22  # float64 log-probabilities per source at a time (32 MiB): memory independent of tokens


def _metrics(decoder: Decoder, sources: dict[str, Any], hidden: dict, ids: torch.Tensor) -> dict[str, Any]:
    """Sums of NLL, KL and top-1 agreement over every predicted token, a chunk of one window's positions at a time:
    the head runs per position, so no source's logits over all tokens x vocabulary are ever held."""
    names = sources["fp32"].checkpoint_names(decoder.exit_names())
    outer = {key: src.load(names) for key, src in sources.items()}
    sums = {k: {"nll": 0.0, "kl": 0.0, "kl2": 0.0, "top1": 0, "d": 0.0, "d2": 0.0} for k in hidden}
    width = ids.shape[1] - 1  # the last position of a window predicts nothing
    step = max(1, min(LOGPROB_CHUNK // int(decoder.config.vocab_size), width))
    for w in range(ids.shape[0]):
        for s in range(0, width, step):
            t = ids[w, s + 1:s + 1 + step].to(decoder.device)
            for key in ["fp32", *(k for k in hidden if k != "fp32")]:
                decoder.load_outer(outer[key])
                lp = torch.log_softmax(decoder.logits(hidden[key][w:w + 1, s:s + step])[0].double(), dim=-1)
                nll = -lp.gather(1, t[:, None])[:, 0]
                sums[key]["nll"] += nll.sum().item()
                if key == "fp32":
                    base, p, top_base, base_nll = lp, lp.exp(), lp.argmax(dim=-1), nll
                    continue
                d = nll - base_nll  # the per-token log-ratio of the perplexities
                sums[key]["d"] += d.sum().item()
                sums[key]["d2"] += d.square().sum().item()
                sums[key]["top1"] += int((lp.argmax(dim=-1) == top_base).sum().item())
                kl = torch.sub(base, lp, out=lp).mul_(p).sum(dim=-1)
                sums[key]["kl"] += kl.sum().item()
                sums[key]["kl2"] += kl.square().sum().item()
    n = ids.shape[0] * width
    base_ppl = math.exp(sums["fp32"]["nll"] / n)
    out: dict[str, Any] = {"tokens": n, "windows": int(ids.shape[0]), "window": int(ids.shape[1]),
                           "baseline_perplexity": base_ppl, "outputs": {}}
    for key, v in sums.items():
        if key == "fp32":
            continue
        ppl, top1 = math.exp(v["nll"] / n), v["top1"] / n
        out["outputs"][key] = {"perplexity": ppl, "baseline_perplexity": base_ppl, "ppl_increase": ppl / base_ppl - 1,
                               "ln_ppl_ratio": v["d"] / n, "ln_ppl_ratio_se": standard_error(v["d"], v["d2"], n),
                               "kl_divergence": v["kl"] / n, "kl_divergence_se": standard_error(v["kl"], v["kl2"], n),
                               "top1_agreement": top1,
                               "top1_agreement_se": math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 1 else 0.0}
    return out


def _figure(result: dict[str, Any]) -> str:
    """A gated figure with its 95 % interval where it has one (the file's size has none)."""
    low, high = result.get("interval", (result["value"], result["value"]))
    return f"{result['value']:.4f}" + (f" [{low:.4f}, {high:.4f}]" if low != high else "")


def standard_error(total: float, squares: float, n: int) -> float:
    """The standard error of a mean of ``n`` per-token values from their sum and sum of squares, as llama.cpp's
    perplexity --kl-divergence computes it: sqrt((E[x²] - E[x]²) / (n - 1))."""
    if n < 2:
        return 0.0
    mean = total / n
    return math.sqrt(max(squares / n - mean * mean, 0.0) / (n - 1))


WORST_MODULES = 8  # per output in the markdown table; quality.json lists every module
METRIC_KEYS = {"perplexity": ("perplexity", "baseline_perplexity", "ppl_increase", "ln_ppl_ratio", "ln_ppl_ratio_se"),
               "kl_divergence": ("kl_divergence", "kl_divergence_se"),
               "top1_agreement": ("top1_agreement", "top1_agreement_se")}


def validate(model: ModelManifest, converted: ConvertManifest, quantized: QuantizeManifest, outputs: list, spec,
             task_digests: dict[str, str], speed_tool: str | None, device: str, store: Store,
             text_sha256: str | None = None) -> QualityManifest:
    metrics = measure(model, converted, outputs, spec, device, store, task_digests, text_sha256)
    keep = {k for name in spec.metrics for k in METRIC_KEYS[name]} | {"simulated", "tasks"}
    metrics["outputs"] = {key: {k: v for k, v in m.items() if k in keep} for key, m in metrics["outputs"].items()}
    if spec.speed is not None:  # after the quality passes, alone on the machine
        metrics["speed"], speeds = measure_speed(model, converted, outputs, spec.speed, speed_tool, store)
        for key, figures in speeds.items():
            metrics["outputs"][key]["speed"] = figures
    return judge(metrics, spec.gates, converted, quantized, store)


def judge(metrics: dict[str, Any], gates, converted: ConvertManifest, quantized: QuantizeManifest,
          store: Store) -> QualityManifest:
    """Apply the gates, write quality.json to the store, and say whether the build may ship."""
    failures: list[str] = []
    report = {"protocol": {k: metrics[k] for k in ("tokens", "windows", "window", "tokens_sha256") if k in metrics},
              "baseline_perplexity": metrics["baseline_perplexity"], "tasks": metrics.get("tasks", {}), "outputs": {},
              **({"speed": metrics["speed"]} if "speed" in metrics else {})}
    for key, m in metrics["outputs"].items():
        results = {}
        built = converted.files[key]
        measured = {**m, "bits_per_weight": built.bits_per_weight}  # the size gate reads the file, not the eval
        for gate, (_, metric) in {**GATES, "max_bits_per_weight": ("size", "bits_per_weight")}.items():
            limit = getattr(gates, gate)
            if limit is None:
                continue
            results[gate] = judge_gate(gate, metric, measured, limit, gates.judge_by)
        for gate, (kind, metric) in TASK_GATES.items():
            limit = getattr(gates, gate)
            for task, figures in m.get("tasks", {}).items():
                if limit is not None and report["tasks"][task]["kind"] == kind:
                    results[f"{gate}:{task}"] = judge_gate(gate, metric, figures, limit, gates.judge_by)
        for gate, result in results.items():
            if not result["passed"]:
                failures.append(f"{key} {gate}: {_figure(result)} vs limit {result['limit']}"
                                + (" (all of its 95 % interval past it)" if gates.judge_by == "interval" else ""))
        q = quantized.outputs.get(key)
        modules = sorted(q.modules, key=lambda r: -(r.relative_output_error or 0.0)) if q else []
        report["outputs"][key] = {**m, "bits_per_weight": built.bits_per_weight,
                                  "nominal_bits_per_weight": built.nominal_bits_per_weight, "gates": results,
                                  "passed": all(r["passed"] for r in results.values()), "fallbacks": built.fallbacks,
                                  "modules": [r.model_dump() for r in modules]}
    report["passed"] = not failures
    blob = store.put_bytes(json.dumps(report, indent=2, sort_keys=True).encode())
    return QualityManifest(report=blob, passed=not failures, table=quality_table(report), failures=failures)


def quality_table(report: dict[str, Any]) -> str:
    p = report["protocol"]
    lines = [f"Quality on {p['tokens']} tokens ({p['windows']} windows of {p['window']}, BOS first); "
             f"FP32 perplexity {report['baseline_perplexity']:.4f}; ± one standard error of the mean over the tokens "
             "(as llama.cpp's perplexity reports it); gates show the 95 % interval", "",
             "| output | bits/weight (nominal) | perplexity | Δ PPL | KL (nats/token) | top-1 agreement | gates |",
             "|---|---|---|---|---|---|---|"]
    for key, m in report["outputs"].items():
        gates = ", ".join(f"{g} {'pass' if r['passed'] else 'FAIL'} ({_figure(r)} vs {r['limit']})"
                          for g, r in m["gates"].items()) or "none"
        ppl = (f"{m['perplexity']:.4f} | {m['ppl_increase'] * 100:+.2f} ± "
               f"{standard_error_of('ppl_increase', m) * 100:.2f} %" if "perplexity" in m else "- | -")
        kl = (f"{m['kl_divergence']:.5f} ± {standard_error_of('kl_divergence', m):.2g}" if "kl_divergence" in m
              else "-")
        top1 = (f"{m['top1_agreement'] * 100:.2f} ± {standard_error_of('top1_agreement', m) * 100:.2f} %"
                if "top1_agreement" in m else "-")
        lines.append(f"| {key} | {m['bits_per_weight']:.3f} ({m['nominal_bits_per_weight']:.3f}) | {ppl} | {kl} | {top1} | {gates} |")
    lines += task_table(report) + speed_table(report)
    for key, m in report["outputs"].items():
        if m.get("simulated"):
            lines += ["", f"{key}: measured as served, simulating " + "; ".join(m["simulated"])]
    for key, m in report["outputs"].items():
        if m["fallbacks"]:
            lines += ["", f"{key}: {len(m['fallbacks'])} tensors differ from the recipe (each listed in quality.json): "
                      + "; ".join(summary(m["fallbacks"]))]
    for key, m in report["outputs"].items():
        worst = [r for r in m["modules"] if r["grid"] and r["relative_output_error"] is not None][:WORST_MODULES]
        if worst:
            lines += ["", f"{key}: modules with the largest relative output error on the calibration inputs "
                      f"(all {len(m['modules'])} in quality.json)", "", "| module | method | grid | relative error |",
                      "|---|---|---|---|"]
            lines += [f"| {r['name']} | {r.get('method') or '-'} | {r['grid']} | {r['relative_output_error']:.5f} |"
                      for r in worst]
    return "\n".join(lines)


def task_table(report: dict[str, Any]) -> list[str]:
    """The task evals: the unquantized model's figures, then each output's, ± one standard error over the items."""
    lines: list[str] = []
    for task, t in report.get("tasks", {}).items():
        if t["kind"] == "multiple_choice":
            lines += ["", f"Task {task}: {t['items']} multiple-choice items (`{t['source']}`, sha256 "
                      f"{t['sha256'][:12]}…), log-likelihood scoring as lm-eval; the gate reads {t['score']}", "",
                      "| model | accuracy | accuracy_norm | drop in " + t["score"] + " |", "|---|---|---|---|",
                      f"| unquantized | {_pct(t['baseline'], 'accuracy')} | {_pct(t['baseline'], 'accuracy_norm')} | - |"]
            lines += [f"| {key} | {_pct(m['tasks'][task], 'accuracy')} | {_pct(m['tasks'][task], 'accuracy_norm')} | "
                      f"{_pct(m['tasks'][task], 'accuracy_drop')} |" for key, m in report["outputs"].items()]
        else:
            n = t["baseline"]["continuation_tokens"]
            lines += ["", f"Task {task}: {t['items']} prompts (`{t['source']}`, sha256 {t['sha256'][:12]}…), greedy "
                      f"continuations of {n} tokens against the unquantized model's", "",
                      "| output | exact match | first differing token (mean position) |", "|---|---|---|"]
            lines += [f"| {key} | {_pct(m['tasks'][task], 'exact_match')} | {m['tasks'][task]['first_difference']:.1f} "
                      f"± {m['tasks'][task]['first_difference_se']:.1f} of {n} |" for key, m in report["outputs"].items()]
    return lines


def _pct(m: dict[str, Any], figure: str) -> str:
    return f"{m[figure] * 100:.1f} ± {m[figure + '_se'] * 100:.1f} %"


def speed_table(report: dict[str, Any]) -> list[str]:
    """llama-bench's tokens/s of each GGUF output beside its size and KL, the F16 reference first."""
    speed = report.get("speed")
    if speed is None:
        return []
    if "skipped" in speed:
        return ["", f"Speed: not measured: {speed['skipped']}"]
    s, machine = speed["settings"], speed["machine"]
    pp, tg = f"pp{s['prompt_tokens']}", f"tg{s['generated_tokens']}"
    ran_on = ", ".join(str(x) for x in (f"llama.cpp {machine['build_commit']}", machine["backends"],
                                        machine["cpu_info"], machine.get("gpu_info"),
                                        f"{machine['n_threads']} threads", machine.get("note")) if x)
    lines = ["", f"Speed on this machine ({ran_on}): llama-bench's {pp}, a {s['prompt_tokens']}-token prompt in one "
             f"batch, and {tg}, {s['generated_tokens']} tokens generated one at a time; tokens/s, mean ± standard "
             f"deviation over {s['repetitions']} runs", "",
             f"| file | bits/weight | KL (nats/token) | {pp} tokens/s | {tg} tokens/s |", "|---|---|---|---|---|"]
    rows = ([(REFERENCE, speed["reference"]["bits_per_weight"], None, speed["reference"])] if "reference" in speed
            else [])
    rows += [(key, m["bits_per_weight"], m.get("kl_divergence"), m["speed"])
             for key, m in report["outputs"].items() if "speed" in m]
    for key, bits, kl, f in rows:
        lines.append(f"| {key} | {bits:.3f} | {'-' if kl is None else f'{kl:.5f}'} | "
                     f"{f['prompt_tokens_per_s']:,.1f} ± {f['prompt_tokens_per_s_sd']:,.1f} | "
                     f"{f['generation_tokens_per_s']:,.1f} ± {f['generation_tokens_per_s_sd']:,.1f} |")
    return lines
