"""prefect.yaml's deployments, one per recipe: `prefect deployment run quantize/<recipe name>`.

``quantfab deployments sync`` rewrites the recipe entries of prefect.yaml from recipes/ and keeps every
other entry (the watch flow, hand-written ones) as it is; ``--check`` only says whether they agree.

The entrypoint is the installed module ``quantfab.pipelines.quantize:quantize``, not the file
``pipelines/quantize.py``. Prefect imports either with the flow run's working directory on sys.path; what
keeps a bare ``kernels`` from meaning our folder there is ``pipelines/bare_names.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from quantfab.pipelines.quantize import recipe_tags
from quantfab.pipelines.recipe_loading import load_recipe

ENTRYPOINT = "quantfab.pipelines.quantize:quantize"
WORK_POOL = "quantfab"
MARK = "quantfab-recipe"  # tag of the entries sync owns


def recipe_deployment(path: Path, root: Path) -> dict[str, Any]:
    """The prefect.yaml entry of one recipe (its path relative to the project root, as the worker sees it)."""
    recipe = load_recipe(path, [])
    return {
        "name": recipe.name,
        "description": recipe.description or f"Build {recipe.name}",
        "entrypoint": ENTRYPOINT,
        "parameters": {"recipe_path": path.resolve().relative_to(root.resolve()).as_posix()},
        "work_pool": {"name": WORK_POOL},
        "tags": [MARK, *recipe_tags(recipe)],
    }


def recipe_deployments(root: Path) -> list[dict[str, Any]]:
    return [recipe_deployment(p, root) for p in sorted((root / "recipes").glob("*.yaml"))]


def synced(document: dict[str, Any], root: Path) -> dict[str, Any]:
    """``document`` (prefect.yaml's content) with its recipe entries replaced by those recipes/ gives."""
    others = [d for d in document.get("deployments") or [] if MARK not in (d.get("tags") or [])]
    return {**document, "deployments": recipe_deployments(root) + others}


def sync(prefect_yaml: Path, check: bool) -> bool:
    """Rewrite prefect.yaml (unless ``check``); whether it already agreed with recipes/."""
    document = yaml.safe_load(prefect_yaml.read_text()) or {}
    wanted = synced(document, prefect_yaml.parent)
    agrees = wanted == document
    if not agrees and not check:
        prefect_yaml.write_text(HEADER + yaml.safe_dump(wanted, sort_keys=False, width=120))
    return agrees


HEADER = """\
# Prefect deployments: one per recipe, `prefect deployment run quantize/<recipe name>`.
# The recipe entries (tagged quantfab-recipe) are written by `quantfab deployments sync`; edit the
# recipes, not them. Other entries are kept as they are. See README, "Deployments on a team server".
"""
