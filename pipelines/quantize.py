"""The `quantize` flow: download → calibrate → quantize → convert → validate → package.

Thin wiring: each stage is a cached Prefect task (pipelines/stages.py) over a plain function in
quantfab.tasks; stages hand each other manifests. A cache hit whose blobs have left the store, or whose
package has left the destination, is recomputed rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import nullcontext
from importlib.metadata import version as dist_version
from typing import Any, Callable

import yaml
from prefect import flow, tags, task
from prefect.artifacts import create_markdown_artifact

from quantfab.pipelines.recipe import ExecutionSpec, Recipe
from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.pipelines.stages import STAGES, code_digest
from quantfab.tasks.redact import redact, redact_text
from quantfab.tasks.errors import QualityGateFailed, UserError
from quantfab.tasks.manifests import Manifest, ModelManifest, PackageManifest
from quantfab.tasks.package import published
from quantfab.tasks.quantize.stage import reads_statistics
from quantfab.tasks.store import Store

ORDER = ("download", "calibrate", "quantize", "convert", "validate", "package")
StageListener = Callable[[str, str, float], None]
LISTENERS: list[StageListener] = []  # (stage, "ran" | "cached", seconds); the CLI draws progress with it


def recipe_yaml(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json", by_alias=True, exclude={"extends"})
    for section, key in (("model", "source"), ("calibration", "source"), ("validate", "source"), ("package", "destination")):
        data[section][key] = redact(data[section][key])
    return yaml.safe_dump(data, sort_keys=False)


def recipe_tags(recipe: Recipe) -> list[str]:
    """Tags of a build's task runs (and of its deployment): its method and formats."""
    return [f"method:{recipe.quantize.method}", *(f"format:{f}" for f in sorted({o.format for o in recipe.outputs}))]


def recipe_digest(recipe: Recipe) -> str:
    return hashlib.sha256(recipe_yaml(recipe).encode()).hexdigest()


def weights_only(model: ModelManifest) -> ModelManifest:
    """The download manifest without its source and revision labels.

    The stages between download and package read only the files, so they key on their content: a new
    revision label over the same bytes (a watch run, a moved mirror) reruns download and package only.
    """
    return model.model_copy(update={"source": "", "revision": ""})


def stage_inputs(stage: str, recipe: Recipe, store_url: str, up: dict[str, Any]) -> dict[str, Any]:
    """Every argument of a stage's task, by keyword, from the recipe and the upstream manifests."""
    common = {"store_url": store_url, "code": code_digest(stage)}
    device = recipe.execution.device
    if stage == "download":
        return {"model": recipe.model, **common}
    files = weights_only(up["download"])
    if stage == "calibrate":
        statistics = reads_statistics(files, recipe.quantize, list(recipe.outputs), Store(store_url))
        return {"model": files, "calibration": recipe.calibration, "statistics": statistics, "device": device, **common}
    if stage == "quantize":
        return {"model": files, "calibration": up["calibrate"], "quantize": recipe.quantize,
                "outputs": list(recipe.outputs), "device": device, **common}
    if stage == "convert":
        return {"model": files, "quantized": up["quantize"], "outputs": list(recipe.outputs),
                "name": recipe.name, **common}
    if stage == "validate":
        return {"model": files, "converted": up["convert"], "quantized": up["quantize"],
                "outputs": list(recipe.outputs), "validate": recipe.validate_, "device": device, **common}
    return {"name": recipe.name, "model": up["download"], "converted": up["convert"], "quality": up["validate"],
            "recipe_yaml": recipe_yaml(recipe), "recipe_digest": recipe_digest(recipe),
            "destination": recipe.package.destination, "version": dist_version("quantfab"), **common}


def _still_valid(result: Any, store: Store, destination: str) -> bool:
    if isinstance(result, PackageManifest):
        return published(destination, result)
    return not isinstance(result, Manifest) or result.present_in(store)


def _call(task: Any, inputs: dict[str, Any], runner: Any) -> Any:
    """Run a stage task here, or on the Dask cluster; its final state either way."""
    if runner is None:
        return task(**inputs, return_state=True)
    future = runner.submit(task, parameters=inputs)
    future.wait()
    return future.state


def _runner(execution: Any) -> Any:
    """prefect-dask's DaskTaskRunner for ``execution.runner: dask``, else None (stages run in the flow's process)."""
    if execution.runner != "dask":
        return None
    from prefect_dask import DaskTaskRunner

    if execution.dask_address:
        return DaskTaskRunner(address=execution.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": execution.dask_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


def _run_stage(stage: str, inputs: dict[str, Any], store: Store, destination: str, runner: Any = None) -> tuple[Any, bool]:
    task = STAGES[stage].with_options(result_storage=store.results_dir())
    start = time.perf_counter()
    state = _call(task, inputs, runner)
    result = state.result()
    cached = state.name == "Cached"
    if cached and not _still_valid(result, store, destination):
        state = _call(task.with_options(refresh_cache=True), inputs, runner)
        result, cached = state.result(), False
    for listener in LISTENERS:
        listener(stage, "cached" if cached else "ran", time.perf_counter() - start)
    return result, cached


def run_name() -> str:
    """`<recipe name>@<model revision>` in the Prefect UI (the path when the recipe does not load)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        recipe = load_recipe(params["recipe_path"], params.get("overrides"))
    except Exception:  # the flow itself reports a bad recipe; a name must not fail first
        return str(params.get("recipe_path"))
    return f"{recipe.name}@{recipe.model.revision or 'latest'}"


@flow(name="quantize", flow_run_name=run_name, validate_parameters=False)
def quantize(recipe_path: str, overrides: list[str] | None = None, store: str | None = None) -> dict[str, Any]:
    """Build every output of one recipe; fail (and publish nothing) if a quality gate fails."""
    recipe = load_recipe(recipe_path, overrides)
    store_obj = Store(store)
    from quantfab.pipelines.plan import plan, render  # plan imports this module

    create_markdown_artifact(key=_artifact_key(f"plan-{recipe.name}"), markdown=f"```\n{redact_text(render(plan(recipe, store_obj.url)))}\n```",
                             description=f"What this run of {recipe.name} will do")
    up: dict[str, Any] = {}
    stages: dict[str, str] = {}
    runner = _runner(recipe.execution)
    with runner or nullcontext(), tags(*recipe_tags(recipe)):
        for stage in ORDER:
            if stage == "package" and not up["validate"].passed:
                raise QualityGateFailed(up["validate"].table, up["validate"].failures)
            up[stage], cached = _run_stage(stage, stage_inputs(stage, recipe, store_obj.url, up), store_obj,
                                           recipe.package.destination, runner)
            stages[stage] = "cached" if cached else "ran"
            if stage == "validate":
                create_markdown_artifact(key=_artifact_key(f"quality-{recipe.name}"), markdown=up[stage].table,
                                         description=f"Quality of {recipe.name}")
    return {"recipe": recipe.name, "stages": stages, "destination": redact(recipe.package.destination),
            "quality": json.loads(store_obj.read_bytes(up["validate"].report)), "table": up["validate"].table}


def check_recipes(recipe_paths: list[str], overrides: list[str] | None) -> None:
    """Every recipe loads, and no two publish to one destination (checked before any starts)."""
    destinations: dict[str, str] = {}
    for path in recipe_paths:
        recipe = load_recipe(path, overrides)
        if recipe.package.destination in destinations:
            raise UserError(f"{path} and {destinations[recipe.package.destination]} would both publish to "
                            f"{redact(recipe.package.destination)}: give each recipe its own package.destination")
        destinations[recipe.package.destination] = str(path)


@task(name="build-recipe")
def build_recipe(recipe_path: str, overrides: list[str], store: str | None) -> dict[str, Any]:
    """One recipe's whole flow, as a task a Dask worker can run (its stages then run on that worker)."""
    return quantize(recipe_path, [*overrides, "execution.runner=local"], store)


@flow(name="quantize-many", validate_parameters=False)
def quantize_many(recipe_paths: list[str], overrides: list[str] | None = None, store: str | None = None,
                  dask_address: str | None = None, dask_workers: int = 2) -> list[dict[str, Any]]:
    """Several recipes at once on one Dask cluster: each recipe's flow runs on a worker, and its stages'
    independent items spread over the whole cluster (tasks/parallel.py), in the recipes' order."""
    check_recipes(recipe_paths, overrides)
    runner = _runner(ExecutionSpec(runner="dask", dask_address=dask_address, dask_workers=dask_workers))
    with runner:
        futures = [runner.submit(build_recipe, parameters={"recipe_path": p, "overrides": list(overrides or []),
                                                            "store": store}) for p in recipe_paths]
        return [f.result() for f in futures]


def _artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
