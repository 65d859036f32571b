"""Stage cache keys, computed as the flow computes them, without torch, transformers or Prefect.

A stage's key is sha256 of the canonical JSON of its name, its task wrapper's source in stages.py (read,
not imported) and its arguments: the recipe's section, the upstream manifests with their blob digests,
the store and ``code``, a digest of the source files the stage runs. The flow gives it to Prefect as the
result record's key; `plan` and an up-to-date `run` (pipelines/uptodate.py) read the record Prefect wrote
under it (``cached_result``).
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from quantfab.pipelines.recipe import Recipe
from quantfab.tasks import manifests
from quantfab.tasks.download import materialize
from quantfab.tasks.eval_items import task_digest
from quantfab.tasks.speed import tool_digest
from quantfab.tasks.manifests import SOURCE_CARD, ModelManifest
from quantfab.tasks.quantize.assign import budget_of, reads_full_statistics, reads_statistics, ships_importance
from quantfab.tasks.redact import redact
from quantfab.tasks.store import Store
from quantfab.tasks.texts import calibration_tokens_read, evaluation_tokens_read, text_digest

ORDER = ("download", "calibrate", "allocate", "quantize", "convert", "validate", "package")
ROOT = Path(__file__).resolve().parent.parent  # where tasks/ and kernels/ live (the repo, or site-packages)
COMMON = ["tasks/errors.py", "tasks/store.py", "tasks/manifests.py", "tasks/modelio.py", "tasks/decoder.py",
          "tasks/model_structure.py", "tasks/families.py", "tasks/checkpoint_map.py", "tasks/download.py"]
GRID_SOURCES = ["tasks/quantize/grids.py", "tasks/quantize/grid_base.py", "tasks/quantize/kquants.py",
                "tasks/quantize/float_grids.py", "tasks/quantize/fp4_grids.py", "tasks/quantize/iq_grids.py",
                "tasks/quantize/lattice.py", "tasks/quantize/iq1_grids.py", "tasks/quantize/iq2_grids.py",
                "tasks/quantize/iq3_grids.py", "tasks/quantize/mlx_grid.py"]
STAGE_SOURCES = {
    "download": ["tasks/synthetic.py"],
    "calibrate": ["tasks/calibrate.py", "tasks/gram.py", "tasks/texts.py", "tasks/activations.py"],
    "allocate": ["tasks/quantize", "tasks/convert", "tasks/validate.py", "tasks/forward.py", "tasks/evals.py",
                 "tasks/eval_items.py", "tasks/speed.py", "tasks/texts.py", "tasks/activations.py",
                 "tasks/gates.py", "tasks/calibrate.py", "tasks/gram.py", "kernels"],  # the budget's types: grids, formats' sizes, the KL forward
    "quantize": ["tasks/quantize", "tasks/calibrate.py", "tasks/gram.py", "tasks/texts.py", "tasks/activations.py",
                 "tasks/convert", "kernels"],  # formats decide each Linear's grid
    "convert": ["tasks/convert", *GRID_SOURCES, "tasks/quantize/layer_file.py", "tasks/activations.py", "kernels"],
    "validate": ["tasks/validate.py", "tasks/forward.py", "tasks/evals.py", "tasks/eval_items.py", "tasks/speed.py", "tasks/activations.py", "tasks/gates.py", "tasks/texts.py", "tasks/convert", *GRID_SOURCES, "tasks/quantize/layer_file.py",
                 "kernels"],
    "package": ["tasks/package.py", "tasks/convert/differences.py", "tasks/regression.py", "tasks/gates.py",
                "tasks/charts.py"],
}
SOURCE_SUFFIXES = (".py", ".cu", ".h")


# imported by stages but unable to change what they write: scheduling, the allocator, log redaction, imports
NO_OUTPUT_EFFECT = ["tasks/__init__.py", "tasks/parallel.py", "tasks/malloc.py", "tasks/redact.py", "tasks/lazy.py"]


def code_digest(stage: str) -> str:
    """sha256 of the stage's source files (and the shared ones), so editing them invalidates its cache."""
    h = hashlib.sha256()
    for rel in COMMON + STAGE_SOURCES[stage]:
        path = ROOT / rel
        files = sorted(f for f in path.rglob("*") if f.suffix in SOURCE_SUFFIXES) if path.is_dir() else [path]
        for f in files:
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(stage: str, inputs: dict[str, Any]) -> str:
    """The stage's cache key for these inputs: sha256 of its name, its wrapper's source and their canonical JSON."""
    text = json.dumps({"stage": stage, "wrapper": _wrapper_source(stage), "inputs": _plain(inputs)}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@lru_cache(maxsize=None)
def _wrapper_source(stage: str) -> str:
    """The source of the stage's function in this file (what Prefect's TASK_SOURCE hashed), read without importing."""
    source = (Path(__file__).parent / "stages.py").read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == stage)
    return ast.get_source_segment(source, node) or ""


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def recipe_yaml(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json", by_alias=True, exclude={"extends"})
    for section, key in (("model", "source"), ("calibration", "source"), ("validate", "source"), ("package", "destination")):
        data[section][key] = redact(data[section][key])
    for task in data["validate"]["tasks"]:
        task["source"] = redact(task["source"])
    return yaml.safe_dump(data, sort_keys=False)


def recipe_digest(recipe: Recipe) -> str:
    return hashlib.sha256(recipe_yaml(recipe).encode()).hexdigest()


def weights_only(model: ModelManifest) -> ModelManifest:
    """The download manifest without its source and revision labels, and without the source's model card.

    The stages between download and package read only the files, so they key on their content: a new
    revision label over the same bytes (a watch run, a moved mirror), or an edit of the upstream README (read by
    package alone, for its license), reruns download and package only.
    """
    return model.model_copy(update={"source": "", "revision": "",
                                    "files": {n: b for n, b in model.files.items() if n != SOURCE_CARD}})


def stage_inputs(stage: str, recipe: Recipe, store_url: str, up: dict[str, Any]) -> dict[str, Any]:
    """Every argument of a stage's task, by keyword, from the recipe and the upstream manifests.

    calibrate's ``statistics`` (whether any output reads the unquantized model's statistics) is decided
    from the model's layout, read from the memo of its frozen config (tasks/model_structure.py): torch
    and transformers are imported only the first time a model is seen."""
    common = {"store_url": store_url, "code": code_digest(stage)}
    device = recipe.execution.device
    if stage == "download":
        return {"model": recipe.model, **common}
    files = weights_only(up["download"])
    if stage == "calibrate":
        statistics, full = _reads_statistics(files, recipe, Store(store_url))
        c = recipe.calibration
        return {"model": files, "calibration": c,
                "text_sha256": text_digest(c.source, calibration_tokens_read(c.samples, c.seq_len)),  # edits rerun it
                "statistics": statistics,
                "diagonal": statistics and not full, "device": device, **common}
    if stage == "allocate":  # the outputs with a size budget: without one it keys on the model and calibration only
        budgeted = [o for o in recipe.outputs if budget_of(o)]
        return {"model": files, "calibration": up["calibrate"], "quantize": recipe.quantize if budgeted else None,
                "outputs": budgeted, "device": device if budgeted else "any", **common}
    if stage == "quantize":
        return {"model": files, "calibration": up["calibrate"], "allocation": up["allocate"],
                "quantize": recipe.quantize, "outputs": list(recipe.outputs), "device": device, **common}
    if stage == "convert":  # the calibration only for an importance matrix: else rtn's convert stays cached
        calibration = up["calibrate"] if ships_importance(list(recipe.outputs)) else None
        return {"model": files, "calibration": calibration, "quantized": up["quantize"],
                "outputs": list(recipe.outputs), "name": recipe.name, **common}
    if stage == "validate":
        v = recipe.validate_
        return {"model": files, "converted": up["convert"], "quantized": up["quantize"],
                "outputs": list(recipe.outputs), "validate": v,
                "text_sha256": text_digest(v.source, evaluation_tokens_read(v.tokens, v.window)),
                "task_digests": {t.label: task_digest(t.source) for t in v.tasks},  # edits rerun it
                "speed_tool": tool_digest() if v.speed else None,  # a rebuilt llama-bench measures again
                "device": device, **common}
    return {"name": recipe.name, "model": up["download"], "calibration": up["calibrate"], "converted": up["convert"],
            "quality": up["validate"],
            "recipe_yaml": recipe_yaml(recipe), "recipe_digest": recipe_digest(recipe),
            "destination": recipe.package.destination, "version": dist_version("quantfab"),
            "max_regression": recipe.validate_.gates.max_regression, **common}


def _reads_statistics(model: ModelManifest, recipe: Recipe, store: Store) -> tuple[bool, bool]:
    """Whether any output reads the statistics, and whether any reads the whole XᵀX (else: its diagonal)."""
    config, tensors = materialize(store, model.files, verify=False).frozen(store.memo_dir())  # config and headers only
    full = reads_full_statistics(config, tensors, recipe.quantize, list(recipe.outputs))
    return reads_statistics(config, tensors, recipe.quantize, list(recipe.outputs), full), full


def cached_result(store: Store, key: str) -> BaseModel | None:
    """The stage result Prefect persisted under ``key`` in the store's results/, read without Prefect.

    The record is JSON (the stages' ``result_serializer="json"``): ``{"metadata": ..., "result": "<json>"}``,
    the result ``{"__class__": "<module>.<class>", "data": {...}}``. Only our manifest classes are
    built from it; anything else (another serializer, an expiry, a torn or foreign record) reads as None,
    and the flow, which asks Prefect, decides.
    """
    try:
        record = json.loads((store.results_dir() / key).read_bytes())
        meta, value = record["metadata"], json.loads(record["result"])
        module, _, name = value["__class__"].rpartition(".")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    cls = getattr(manifests, name, None) if module == manifests.__name__ else None
    if meta.get("serializer", {}).get("type") != "json" or meta.get("expiration") is not None \
            or not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        return None
    try:
        return cls.model_validate(value["data"])
    except (ValueError, KeyError, TypeError):
        return None
