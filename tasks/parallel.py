"""Independent work items of a stage, spread over the Dask cluster the stage runs on, if it runs on one.

A stage that the flow submitted to prefect-dask's DaskTaskRunner (``execution.runner: dask``) runs on a
Dask worker; there ``pmap`` hands its items to the whole cluster through a worker client (which secedes
from the worker's thread pool while it waits, so a one-thread worker cannot deadlock) and returns the
results in order. Anywhere else it is a plain loop. Either way the same function computes each item,
so the output does not depend on where it ran.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def on_dask_worker() -> bool:
    if "distributed" not in sys.modules:  # a Dask worker imported it long before it runs a stage; importing costs ~0.4 s
        return False
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _with_worker(fn: Callable[[T], R], x: T) -> tuple[R, str]:
    from distributed import get_worker

    return fn(x), get_worker().address


def pmap(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """[fn(x) for x in items], on the cluster when called from a Dask worker (and logged to the task run)."""
    items = list(items)
    if len(items) < 2 or not on_dask_worker():
        return [fn(x) for x in items]
    from distributed import worker_client
    from prefect.logging import get_run_logger

    with worker_client() as client:
        done = client.gather(client.map(partial(_with_worker, fn), items, pure=False))
    workers = sorted({w for _, w in done})
    get_run_logger().info("%s: %d items over %d Dask workers (%s)", getattr(fn, "__name__", "work"), len(items),
                          len(workers), ", ".join(workers))
    return [r for r, _ in done]
