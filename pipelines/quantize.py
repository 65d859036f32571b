"""The `quantize` flow: download → calibrate → quantize → convert → validate → package.

Thin wiring: each stage is a cached Prefect task (pipelines/stages.py) over a plain function in
quantfab.tasks; stages hand each other manifests. A cache hit whose blobs have left the store, or whose
package has left the destination, is recomputed rather than trusted.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact

from quantfab.pipelines.recipe import ExecutionSpec, Recipe
from quantfab.pipelines.recipe_loading import check_recipes, load_recipe
from quantfab.pipelines.keys import ORDER, cache_key, stage_inputs
from quantfab.pipelines.stages import STAGES
from quantfab.tasks.redact import redact, redact_text
from quantfab.tasks.builds import BuildLog
from quantfab.tasks.errors import QualityGateFailed, StoreDamaged
from quantfab.tasks.locks import stage_lock
from quantfab.tasks.manifests import Manifest, PackageManifest
from quantfab.tasks.package import publication_problem
from quantfab.tasks.store import Blob, BlobUnavailable, Store, WriteFailed

StageListener = Callable[[str, str, float], None]
LISTENERS: list[StageListener] = []  # (stage, "ran" | "cached", seconds); the CLI draws progress with it
NOTICES: list[Callable[[str], None]] = []  # what a run found and repaired (a damaged blob, a changed package)
REPAIRS = 2  # reruns of the flow after a stage found a blob it reads missing or damaged


def recipe_tags(recipe: Recipe) -> list[str]:
    """Tags of a build's task runs (and of its deployment): its method and formats."""
    return [f"method:{recipe.quantize.method}", *(f"format:{f}" for f in sorted({o.format for o in recipe.outputs}))]


def _cache_problems(result: Any, store: Store, destination: str) -> list[str]:
    """Why a cached result cannot be used: its blobs missing or damaged in the store, or its package changed."""
    if isinstance(result, PackageManifest):
        problem = publication_problem(destination, result)
        return [f"{redact(destination)}: {problem}"] if problem else []
    return result.problems(store) if isinstance(result, Manifest) else []


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


def _run_stage(stage: str, inputs: dict[str, Any], store: Store, build: BuildLog, destination: str,
               runner: Any = None) -> tuple[Any, bool]:
    """One stage, cached or run, under the lock of its cache key: of several runs sharing the store, one
    computes it and the others wait, then find it cached. Its blobs are recorded in the build's record
    (so gc keeps them); ones a gc removed meanwhile make it run again."""
    task = STAGES[stage].with_options(result_storage=store.results_dir())
    start = time.perf_counter()
    key = cache_key(stage, inputs)
    with stage_lock(store, f"{stage}-{key}", partial(_notify_waiting, stage)):
        state = _call(task, inputs, runner)
        result = state.result()
        cached = state.name == "Cached"
        problems = _cache_problems(result, store, destination) if cached else []
        if not problems:
            problems = [f"sha256 {b.digest}: removed by gc meanwhile" for b in build.hold(stage, key, _blobs(result))]
        if problems:
            _notify(f"{stage}: its cached result cannot be used, rerunning it: " + "; ".join(problems))
            state = _call(task.with_options(refresh_cache=True), inputs, runner)
            result, cached = state.result(), False
            build.hold(stage, key, _blobs(result))
    for listener in LISTENERS:
        listener(stage, "cached" if cached else "ran", time.perf_counter() - start)
    return result, cached


def _blobs(result: Any) -> list[Blob]:
    return list(result.named_blobs().values()) if isinstance(result, Manifest) else []


def _run_stages(recipe: Recipe, store: Store, build: BuildLog, runner: Any, up: dict[str, Any],
                stages: dict[str, str]) -> None:
    """Every stage in order, each cached or run; ``up`` and ``stages`` fill as they finish."""
    for stage in ORDER:
        if stage == "package" and not up["validate"].passed:
            raise QualityGateFailed(up["validate"].table, up["validate"].failures)
        try:
            up[stage], cached = _run_stage(stage, stage_inputs(stage, recipe, store.url, up), store, build,
                                           recipe.package.destination, runner)
        except QualityGateFailed as exc:  # package's max_regression: the comparison with the last build
            create_markdown_artifact(key=_artifact_key(f"regression-{recipe.name}"), markdown=exc.table,
                                     description=f"{recipe.name} against the package it would replace")
            raise
        stages[stage] = "cached" if cached else "ran"
        if stage == "validate":
            create_markdown_artifact(key=_artifact_key(f"quality-{recipe.name}"), markdown=up[stage].table,
                                     description=f"Quality of {recipe.name}")
        if stage == "package":
            _chart_artifacts(recipe, up[stage])
            if up[stage].comparison and not cached:  # what a scheduled rebuild replaced, and how it compares
                create_markdown_artifact(key=_artifact_key(f"regression-{recipe.name}"), markdown=up[stage].comparison,
                                         description=f"{recipe.name} against the package it replaced")


def _chart_artifacts(recipe: Recipe, published: Any) -> None:
    """The package's charts, as image artifacts linking to where they were published (redacted)."""
    destination = redact(recipe.package.destination).rstrip("/")
    base = destination if "://" in destination else f"file://{os.path.abspath(destination)}"
    for path in (p for p in published.files if p.startswith("charts/")):
        create_image_artifact(image_url=f"{base}/{path}", key=_artifact_key(f"{recipe.name}-{path}"),
                              description=f"{recipe.name}: {path}")


def _notify_waiting(stage: str, holder: str) -> None:
    _notify(f"{stage}: another run ({holder}) is computing it with these inputs: waiting for its result")


def _notify(text: str) -> None:
    """Tell the user (the CLI prints it) and the flow run's log what the run found and did about it."""
    for notice in NOTICES:
        notice(redact_text(text))
    get_run_logger().warning(redact_text(text))


def _producer(digest: str, up: dict[str, Any]) -> str:
    """Which stage's output a blob is, and where in it: for the message when a stage could not read it."""
    for stage, manifest in up.items():
        if isinstance(manifest, Manifest):
            for at, blob in manifest.named_blobs().items():
                if blob.digest == digest:
                    return f"{stage}'s {at}"
    return "a stage checkpoint"


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
    from quantfab.pipelines.plan import plan, render, space_report  # plan imports this module

    planned = plan(recipe, store_obj.url)
    create_markdown_artifact(key=_artifact_key(f"plan-{recipe.name}"), markdown=f"```\n{redact_text(render(planned))}\n```",
                             description=f"What this run of {recipe.name} will do")
    space = space_report(planned)
    if "NOT ENOUGH" in space:
        _notify(f"this run may not fit: {space}")
    runner = _runner(recipe.execution)
    build = BuildLog(store_obj, recipe.name, redact(recipe.package.destination))
    with runner or nullcontext(), tags(*recipe_tags(recipe)), build:
        for attempt in range(REPAIRS + 1):
            up: dict[str, Any] = {}
            stages: dict[str, str] = {}
            try:
                _run_stages(recipe, store_obj, build, runner, up, stages)
                build.finish("published", up["package"].manifest_sha256)
                break
            except WriteFailed as exc:
                raise WriteFailed(f"{exc} (plan estimated: {space})") from None
            except BlobUnavailable as exc:
                # the damaged blob is out of the store now, so the stage that made it misses its cache and reruns
                what = f"{ORDER[len(up)]} could not read {_producer(exc.digest, up)}: {exc}"
                if attempt == REPAIRS:
                    raise StoreDamaged(f"{what}; the store lost it again after {REPAIRS} rebuilds: check its disk") from None
                _notify(f"{what}; rerunning the stages that make it")
    return {"recipe": recipe.name, "stages": stages, "destination": redact(recipe.package.destination),
            "quality": json.loads(store_obj.read_bytes(up["validate"].report)), "table": up["validate"].table}


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
