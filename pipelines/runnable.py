"""What in a valid recipe cannot run yet, and why: plan shows it, run refuses before any work."""

from __future__ import annotations

from quantfab.pipelines.recipe import Recipe
from quantfab.tasks.errors import UserError
from quantfab.tasks.quantize import PLANNED_METHODS


def blockers(recipe: Recipe) -> dict[str, list[str]]:
    """Stage name -> reasons it cannot run with this build of quantfab."""
    found: dict[str, list[str]] = {}
    methods = {"quantize.method": recipe.quantize.method}
    methods.update({f"quantize.overrides[{k!r}].method": o.method for k, o in recipe.quantize.overrides.items() if o.method})
    for field, method in methods.items():
        if method in PLANNED_METHODS:
            found.setdefault("quantize", []).append(f"{field}: {method}: {PLANNED_METHODS[method]}, not implemented yet")
    return found


def check_runnable(recipe: Recipe) -> None:
    reasons = [r for rs in blockers(recipe).values() for r in rs]
    if reasons:
        raise UserError(f"recipe {recipe.name} cannot run yet: " + "; ".join(reasons))
