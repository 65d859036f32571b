"""The `watch` flow: rebuild every recipe that tracks its upstream when the upstream publishes a new revision.

For each recipe with ``model.track: latest`` it resolves the source's current revision without
downloading it (tasks.download.upstream_revision), compares it with ``source_revision`` in the manifest
last published at the recipe's destination, and starts the recipe's deployment ``quantize/<name>``
with that revision as ``model.revision``, so the build records exactly what it was started for. The
revision it started, and the flow run, are kept in a Prefect Variable per recipe: a later watch run
leaves that revision alone while its build is pending, running or done, and starts it again only if the
build failed, crashed or was cancelled. Deployed on a cron schedule in prefect.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.variables import Variable

from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks.download import upstream_revision
from quantfab.tasks.store import filesystem

RETRY_STATES = {"FAILED", "CRASHED", "CANCELLED", "CANCELLING"}


def published_revision(destination: str) -> str | None:
    """``source_revision`` of the package at ``destination``, None when nothing is published there."""
    fs, root = filesystem(destination, "package.destination")
    try:
        return json.loads(fs.cat_file(f"{root}/manifest.json")).get("source_revision")
    except FileNotFoundError:
        return None


def _variable_name(recipe_name: str) -> str:
    return f"quantfab-watch-{recipe_name}"


def _started_and_alive(recipe_name: str, revision: str) -> bool:
    """Whether an earlier watch run started this revision and that build has not failed."""
    started = Variable.get(_variable_name(recipe_name), default=None)
    if not isinstance(started, dict) or started.get("revision") != revision:
        return False
    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(started["flow_run_id"]).state
        except Exception:  # the run is gone from the server: start again
            return False
    return state is not None and state.type.value not in RETRY_STATES


@flow(name="watch", flow_run_name="watch {recipes}")
def watch(recipes: str = "recipes") -> dict[str, Any]:
    """Start ``quantize/<name>`` for every tracked recipe in ``recipes`` whose upstream changed."""
    logger = get_run_logger()
    started: dict[str, str] = {}
    unchanged: dict[str, str] = {}
    for path in sorted(Path(recipes).glob("*.yaml")):
        recipe = load_recipe(path, [])
        if recipe.model.track != "latest":
            continue
        revision = upstream_revision(recipe.model.source, recipe.model.revision)
        if revision == published_revision(recipe.package.destination) or _started_and_alive(recipe.name, revision):
            unchanged[recipe.name] = revision
            continue
        run = run_deployment(f"quantize/{recipe.name}", timeout=0, tags=["watch"],
                             parameters={"recipe_path": str(path), "overrides": [f"model.revision={revision}"]})
        Variable.set(_variable_name(recipe.name), {"revision": revision, "flow_run_id": str(run.id)}, overwrite=True)
        logger.info("%s: upstream at %s, started flow run %s", recipe.name, revision, run.name)
        started[recipe.name] = revision
    return {"started": started, "unchanged": unchanged}
