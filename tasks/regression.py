"""Is a build worse than the last one? Two packages' quality.json compared output by output (issue #25).

A scheduled rebuild of a new upstream revision must answer that before it replaces last week's package. Every figure
is a mean over the evaluation tokens with a standard error (tasks/validate.py), so a difference is reported with the
error of the difference, sqrt(se_old² + se_new²) (the two evaluations taken as independent, which overstates the
noise when both scored the same tokens: a regression it finds is real). An output regresses when its KL against its
float model rose by more than ``threshold`` of the old KL and by more than 1.96 such errors; PPL, top-1 and the task
evals' accuracies and exact-match rates (validate.tasks) are reported beside it. An output the old package had and the new one lacks is a regression too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from quantfab.tasks.errors import UserError
from quantfab.tasks.gates import Z95, standard_error_of
from quantfab.tasks.redact import redact
from quantfab.tasks.store import filesystem

SHOWN = {"kl_divergence": ("KL", 1.0, "{:.5f}"), "ppl_increase": ("Δ PPL", 100.0, "{:+.2f} %"),
         "top1_agreement": ("top-1", 100.0, "{:.2f} %")}  # metric -> label, scale, format
TASK_FIGURES = ("accuracy", "accuracy_norm", "exact_match")  # shown as "<task>:<figure>", in percent


@dataclass(frozen=True)
class Delta:
    output: str
    metric: str
    old: float
    new: float
    se: float  # of new - old

    @property
    def delta(self) -> float:
        return self.new - self.old


def read_report(package: str) -> dict[str, Any]:
    """A published package's quality.json (a path or fsspec URL of the package folder)."""
    fs, root = filesystem(package, "package")
    try:
        return json.loads(fs.cat_file(f"{root.rstrip('/')}/quality.json"))
    except FileNotFoundError:
        raise UserError(f"{redact(package)}: no quality.json (not a quantfab package)") from None
    except ValueError as exc:
        raise UserError(f"{redact(package)}/quality.json does not parse: {exc}") from None


def compare_reports(old: dict[str, Any], new: dict[str, Any], threshold: float) -> tuple[list[Delta], list[str]]:
    """Every shared figure's difference, and the regressions (why NEW is worse than OLD), output by output."""
    deltas: list[Delta] = []
    regressions = [f"{key}: in the old package, missing from the new one" for key in old.get("outputs", {})
                   if key not in new.get("outputs", {})]
    for key, n in new.get("outputs", {}).items():
        o = old.get("outputs", {}).get(key)
        if o is None:
            continue
        for metric in SHOWN:
            if metric in o and metric in n:
                se = math.hypot(standard_error_of(metric, o), standard_error_of(metric, n))
                deltas.append(Delta(key, metric, o[metric], n[metric], se))
        for task, figures in n.get("tasks", {}).items():
            before = o.get("tasks", {}).get(task, {})
            deltas += [Delta(key, f"{task}:{f}", before[f], figures[f], math.hypot(before[f"{f}_se"], figures[f"{f}_se"]))
                       for f in TASK_FIGURES if f in figures and f in before]
        kl = next((d for d in deltas if d.output == key and d.metric == "kl_divergence"), None)
        if kl is not None and kl.delta > threshold * kl.old and kl.delta > Z95 * kl.se:
            regressions.append(f"{key}: KL {kl.old:.5f} -> {kl.new:.5f} (+{kl.delta / kl.old:.1%} ± "
                               f"{kl.se / kl.old:.1%}), more than {threshold:.0%} and beyond the noise")
    return deltas, regressions


def comparison_table(old: dict[str, Any], new: dict[str, Any], deltas: list[Delta], regressions: list[str]) -> str:
    """Markdown: each output's figures, old and new, and their difference ± its standard error."""
    same = old.get("protocol", {}).get("tokens_sha256") == new.get("protocol", {}).get("tokens_sha256") is not None
    lines = ["| output | figure | old | new | Δ ± se |", "|---|---|---|---|---|"]
    for d in deltas:
        label, scale, form = SHOWN.get(d.metric, (d.metric, 100.0, "{:.1f} %"))
        show = form.format
        lines.append(f"| {d.output} | {label} | {show(d.old * scale)} | {show(d.new * scale)} | "
                     f"{d.delta * scale:+.5g} ± {d.se * scale:.2g} |")
    lines += ["", "evaluated on the same tokens" if same else "evaluated on different tokens (or unrecorded): "
              "the differences include the evaluation's own"]
    lines += ["", "regressions: " + ("; ".join(regressions) if regressions else "none")]
    return "\n".join(lines)
