"""The quality gates a recipe can set on measured quality: gate -> (the metric it needs measured, the
figure of the report it reads). The size gate, max_bits_per_weight, reads the built file instead; the task gates
read each task eval's figures.

Every measured figure is a mean over the evaluation tokens and carries its standard error, computed as llama.cpp's
perplexity --kl-divergence computes it (tokens taken as independent), or over a task's items as lm-eval computes
it (tasks/evals.py): a gate compares either the point estimate or,
with ``judge_by: interval``, the 95 % interval (failing only when all of it lies past the limit).
"""

from __future__ import annotations

import math
from typing import Any

GATES = {"max_ppl_increase": ("perplexity", "ppl_increase"), "max_kl": ("kl_divergence", "kl_divergence"),
         "min_top1": ("top1_agreement", "top1_agreement")}
# task gates: gate -> (the kind of validate.tasks task it limits, the task figure it reads), per output and task
TASK_GATES = {"max_accuracy_drop": ("multiple_choice", "accuracy_drop"), "min_exact_match": ("continuation", "exact_match")}
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval


def standard_error_of(metric: str, m: dict[str, Any]) -> float:
    """A report figure's standard error (0 where it has none): Δ PPL's through its log-ratio, (1 + Δ) se(ln ratio),
    as llama.cpp reports PPL(Q)/PPL(base) ± its error."""
    if metric == "ppl_increase":
        return (1 + m["ppl_increase"]) * m.get("ln_ppl_ratio_se", 0.0)
    return m.get(f"{metric}_se", 0.0)


def interval(metric: str, m: dict[str, Any]) -> tuple[float, float]:
    """The 95 % interval of a report figure: ± 1.96 standard errors of its mean (Δ PPL through the mean of the
    per-token log-ratio, as exp(ln ± 1.96 se) - 1); a figure without an error (the file's size) is exact."""
    if metric == "ppl_increase" and "ln_ppl_ratio_se" in m:
        ln, se = m["ln_ppl_ratio"], m["ln_ppl_ratio_se"]
        return math.expm1(ln - Z95 * se), math.expm1(ln + Z95 * se)
    se = standard_error_of(metric, m)
    return m[metric] - Z95 * se, m[metric] + Z95 * se


def judge_gate(gate: str, metric: str, m: dict[str, Any], limit: float, judge_by: str) -> dict[str, Any]:
    """One gate's verdict. ``estimate``: the point estimate must be within the limit. ``interval``: the gate fails
    only when the whole 95 % interval lies past the limit (the output is worse beyond the evaluation's noise)."""
    value, (low, high) = m[metric], interval(metric, m)
    lower_is_better = not gate.startswith("min_")
    if judge_by == "interval":
        passed = low <= limit if lower_is_better else high >= limit
    else:
        passed = value <= limit if lower_is_better else value >= limit
    return {"value": value, "interval": [low, high], "limit": limit, "passed": passed, "judged_by": judge_by}
