"""Is a recipe's build up to date? Answered without torch, transformers or Prefect, in about a second.

It is the answer the flow would reach with every stage a cache hit: each stage's key computed as the
flow computes it (pipelines/keys.py), the record Prefect wrote under it read from the store, its blobs
checked as a cache hit checks them (present, size and file stamp), and the published package checked
against its manifest. Anything short of that (a missing or unreadable record, a damaged blob, a changed
package, a failed gate) answers None, and the caller runs the flow, which finds and repairs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from quantfab.pipelines.keys import ORDER, cache_key, cached_result, stage_inputs
from quantfab.pipelines.recipe import Recipe
from quantfab.tasks.builds import BuildLog
from quantfab.tasks.manifests import Manifest, PackageManifest, QualityManifest
from quantfab.tasks.package import publication_problem
from quantfab.tasks.redact import redact
from quantfab.tasks.store import Store


@dataclass
class Cached:
    """One stage's usable cache hit: its key and result, and how long finding and checking it took."""

    key: str
    result: Any  # the stage's manifest
    seconds: float


def up_to_date(recipe: Recipe, store: Store) -> dict[str, Cached] | None:
    """Every stage's cache hit, by stage, when the build is up to date and published; else None."""
    found: dict[str, Cached] = {}
    for stage in ORDER:
        start = time.perf_counter()
        key = cache_key(stage, stage_inputs(stage, recipe, store.url, {s: c.result for s, c in found.items()}))
        result = cached_result(store, key)
        if result is None or not _usable(result, store, recipe.package.destination):
            return None
        found[stage] = Cached(key, result, time.perf_counter() - start)
    return found


def _usable(result: Any, store: Store, destination: str) -> bool:
    if isinstance(result, PackageManifest):
        return publication_problem(destination, result) is None
    if isinstance(result, QualityManifest) and not result.passed:
        return False  # the flow reports the failed gate
    return isinstance(result, Manifest) and not result.problems(store, move_aside=False)


def record_build(recipe: Recipe, store: Store, stages: dict[str, Cached]) -> bool:
    """Write the build record a run writes (gc keeps what it holds); False when a gc removed one of its
    blobs meanwhile, and the flow must rebuild it."""
    with BuildLog(store, recipe.name, redact(recipe.package.destination)) as build:
        for stage, cached in stages.items():
            blobs = list(cached.result.named_blobs().values()) if isinstance(cached.result, Manifest) else []
            if build.hold(stage, cached.key, blobs):
                return False
        build.finish("published", stages["package"].result.manifest_sha256)
    return True
