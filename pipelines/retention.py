"""The `gc` flow: `quantfab gc` as a Prefect deployment, run after each completed build (prefect.yaml's
``store-gc`` trigger) so a scheduled re-quantization never grows the store past its policy."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from quantfab.pipelines.store_cli import render
from quantfab.tasks.retention import Policy, collect
from quantfab.tasks.store import Store


@flow(name="gc", validate_parameters=False)
def gc(store: str | None = None, keep_last: int = 3, max_size_gib: float | None = None,
       quarantine_days: float = 14) -> dict[str, int]:
    """Apply the retention policy to the store; fails when the size cap cannot be met (the report says why)."""
    policy = Policy(keep_last=keep_last, quarantine_days=quarantine_days,
                    max_size=None if max_size_gib is None else int(max_size_gib * 2**30))
    out = collect(Store(store), policy)
    report = render(out, dry_run=False)
    get_run_logger().info(report)
    create_markdown_artifact(key="store-gc", markdown=f"```\n{report}\n```", description="What gc kept and removed")
    if out.unmet:
        raise RuntimeError(f"store over its cap: {out.unmet}")
    return {"freed": out.freed, "size_after": out.size_after}
