"""`quantfab plan --base REF`: what a pull request changes in recipes/, before any GPU time is spent.

Every recipe is loaded twice, as the working tree has it and as REF had it (recipes/ read with
`git show`), with `extends:` resolved and strings as written. A recipe whose resolved fields differ (a
parent's edit counts for its children), or that is new or gone, is reported: the field-level diff, the
stages the change invalidates and why, then the usual plan of the new version (cache status, estimated
peak memory per stage, size and bits per weight per output, the gates). Text, markdown (a pull-request
comment) or JSON.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantfab.pipelines.plan import Plan, plan, render
from quantfab.pipelines.keys import ORDER
from quantfab.pipelines.recipe import Recipe
from quantfab.tasks.quantize.assign import budget_of
from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks.errors import UserError

FIRST_STAGE = {  # recipe section -> the first stage whose cache key holds it
    "model": "download", "calibration": "calibrate", "execution": "calibrate", "quantize": "quantize",
    "outputs": "quantize", "name": "convert", "validate": "validate", "package": "package", "description": "package",
}


@dataclass
class RecipeChange:
    path: str  # relative to the project root
    status: str  # changed | added | removed
    fields: dict[str, tuple[Any, Any]]  # dotted field -> (before, after)
    stages: dict[str, str]  # stage -> why it reruns
    plan: Plan | None  # of the new version


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def _fields(recipe: Recipe | None) -> dict[str, Any]:
    return {} if recipe is None else _flat(recipe.model_dump(mode="json", by_alias=True, exclude={"extends"}))


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"git {' '.join(args)}: {done.stderr.strip() or 'failed'}")
    return done.stdout


def base_recipes(root: Path, ref: str, folder: Path) -> dict[str, Path]:
    """recipes/ as ``ref`` had it, written under ``folder``; relative path -> file."""
    out = {}
    for rel in _git(root, "ls-tree", "-r", "--name-only", ref, "--", "recipes").split():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_git(root, "show", f"{ref}:{rel}"))
        if rel.endswith((".yaml", ".yml")):
            out[rel] = target
    return out


def invalidated(fields: dict[str, tuple[Any, Any]]) -> dict[str, str]:
    """stage -> why it reruns: the earliest stage a changed field feeds, and every stage after it."""
    first: dict[str, list[str]] = {}
    for name in fields:
        first.setdefault(FIRST_STAGE.get(name.split(".")[0], "download"), []).append(name)
    if not first:
        return {}
    start = min(ORDER.index(s) for s in first)
    out = {}
    for stage in ORDER[start:]:
        changed = first.get(stage)
        out[stage] = f"{', '.join(changed)} changed" if changed else "an upstream stage reruns"
    return out


def budgeted(*recipes: Recipe | None) -> bool:
    """Whether an output of either version has a size budget: then allocate reads what quantize reads (a recipe
    without one keys allocate on the model and calibration alone, so it stays cached)."""
    return any(budget_of(o) for r in recipes if r for o in r.outputs)


def _gathering(before: str | None, after: str | None) -> dict[str, str]:
    """calibrate reruns when a change of method or outputs changes what it gathers of the unquantized model's
    statistics (sequential methods measure their own inputs; an importance matrix alone reads XᵀX's diagonal),
    although no calibration field changed."""
    if before is None or after is None or before == after:
        return {}
    why = " (quantize.method, quantize.overrides or outputs)"
    if "none" in (before, after):
        return {"calibrate": "the outputs " + ("no longer read" if after == "none" else "now read") +
                             " the unquantized model's statistics" + why}
    return {"calibrate": "the outputs now read " + ("XᵀX's diagonal alone (an importance matrix)" if after == "diagonal"
                                                    else "the whole XᵀX of the unquantized model's statistics") + why}


def _statistics(path: Path, root: Path, store_url: str | None) -> str | None:
    """What the base version's calibrate gathers (None where it cannot be planned)."""
    try:
        return plan(load_recipe(path, root=root), store_url).gathers
    except UserError:
        return None


def review(root: Path, ref: str, only: list[str], store_url: str | None) -> list[RecipeChange]:
    head = {p.relative_to(root).as_posix(): p for p in sorted((root / "recipes").glob("*.y*ml"))}
    with tempfile.TemporaryDirectory() as tmp:
        base = base_recipes(root, ref, Path(tmp))
        changes = []
        for rel in sorted(set(head) | set(base)):
            if only and rel not in only and Path(rel).name not in only:
                continue
            before = load_recipe(base[rel], as_written=True, root=Path(tmp)) if rel in base else None
            after = load_recipe(head[rel], as_written=True, root=root) if rel in head else None
            old, new = _fields(before), _fields(after)
            fields = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
            if not fields:
                continue
            status = "added" if before is None else "removed" if after is None else "changed"
            stages = invalidated(fields) if status == "changed" else {s: status for s in ORDER} if after else {}
            if "quantize" in stages and "allocate" not in stages and budgeted(before, after):
                stages = {s: stages["quantize"] if s == "allocate" else stages[s] for s in ORDER if s in stages
                          or s == "allocate"}
            new_plan = plan(load_recipe(head[rel], root=root), store_url) if after else None
            if new_plan and stages and "calibrate" not in stages and "download" not in stages:
                stages = _gathering(_statistics(base[rel], Path(tmp), store_url), new_plan.gathers) | stages
            changes.append(RecipeChange(rel, status, fields, stages, new_plan))
    return changes


def _value(v: Any) -> str:
    return "—" if v is None else json.dumps(v) if not isinstance(v, str) else v


def render_text(changes: list[RecipeChange], ref: str) -> str:
    if not changes:
        return f"no recipe changed since {ref}"
    out = []
    for c in changes:
        out += [f"== {c.path} ({c.status} since {ref})", "fields:"]
        out += [f"  {k}: {_value(a)} -> {_value(b)}" for k, (a, b) in c.fields.items()]
        if c.stages:
            out += ["reruns:"] + [f"  {s:<10} {why}" for s, why in c.stages.items()]
        if c.plan:
            out += ["", render(c.plan)]
        out.append("")
    return "\n".join(out)


def render_markdown(changes: list[RecipeChange], ref: str) -> str:
    if not changes:
        return f"### quantfab plan\n\nNo recipe changed since `{ref}`.\n"
    out = [f"### quantfab plan against `{ref}`", ""]
    for c in changes:
        out += [f"#### `{c.path}` ({c.status})", "", "| field | before | after |", "|---|---|---|"]
        out += [f"| `{k}` | `{_value(a)}` | `{_value(b)}` |" for k, (a, b) in c.fields.items()]
        if c.plan:
            p = c.plan
            out += ["", "| stage | reruns because | cache now | est. peak memory |", "|---|---|---|---|"]
            for s in p.stages:
                mem = f"{p.memory[s.stage] / 2**20:,.0f} MiB" if p.memory.get(s.stage) else "—"
                out.append(f"| {s.stage} | {c.stages.get(s.stage, 'unchanged')} | {s.status} | {mem} |")
            if p.peak_rss:
                out += ["", f"Est. peak RSS of this run: {p.peak_rss / 2**20:,.0f} MiB"]
            out += ["", "| output | est. size | bits/weight | nominal | differences from the recipe |", "|---|---:|---:|---:|---|"]
            for key, size in p.sizes.items():
                out.append(f"| `{key}` | {size} | | | |" if isinstance(size, str)
                           else f"| `{key}` | {size[0] / 2**20:,.2f} MiB | {size[1]:.3f} | {p.nominal[key]:.3f} | "
                                f"{'<br>'.join(p.notes(key)) or 'none'} |")
            gates = p.recipe.validate_.gates.limits()
            out += ["", "Quality gates: " + (", ".join(f"`{k}` {v}" for k, v in gates.items()) or "none")]
        out.append("")
    return "\n".join(out)


def render_json(changes: list[RecipeChange], ref: str) -> str:
    def one(c: RecipeChange) -> dict[str, Any]:
        p = c.plan
        return {"path": c.path, "status": c.status,
                "fields": {k: {"before": a, "after": b} for k, (a, b) in c.fields.items()},
                "reruns": c.stages,
                "stages": [{"stage": s.stage, "cache": s.status, "why": s.why, "peak_memory_bytes": p.memory.get(s.stage)}
                           for s in p.stages] if p else [],
                "peak_rss_bytes": p.peak_rss if p else None,
                "outputs": {k: ({"bytes": v[0], "bits_per_weight": round(v[1], 4), "nominal_bits_per_weight": round(p.nominal[k], 4),
                                 "fallbacks": p.fallbacks[k]} if not isinstance(v, str) else {"unknown": v})
                            for k, v in p.sizes.items()} if p else {},
                "gates": p.recipe.validate_.gates.limits() if p else {}}

    return json.dumps({"base": ref, "recipes": [one(c) for c in changes]}, indent=2)
