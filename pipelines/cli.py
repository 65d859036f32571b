"""The `quantfab` command: run, plan, verify, gc, builds, pin, schema, families and deployments.

Exit codes: 0 built, 1 a quality gate or the verification of packed tensors failed (nothing published) or
`verify` found a file that does not match or `gc` could not bring the store under --max-size, 2 bad input
(message, no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from quantfab.tasks.redact import redact_text

console = Console(stderr=True, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantfab", description="Build quantized LLMs from YAML recipes.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run a recipe's flow on a local Prefect"), ("plan", "show what a run would do, without running it")):
        p = sub.add_parser(name, help=text)
        if name == "run":
            p.add_argument("recipe", nargs="+", help="path to the recipe YAML; several run at once on a Dask cluster")
            p.add_argument("--dask-address", default=None, help="with several recipes: a running Dask scheduler "
                           "(default: a LocalCluster of --dask-workers processes)")
            p.add_argument("--dask-workers", type=int, default=2, help="LocalCluster size with several recipes")
        else:
            p.add_argument("recipe", nargs="*", help="path to the recipe YAML (with --base: names or paths to limit the report to)")
            p.add_argument("--base", metavar="GIT_REF", help="report every recipe changed since this git ref "
                           "(field diff, stages invalidated, then each plan)")
            p.add_argument("--format", choices=("text", "markdown", "json"), default="text", help="with --base")
            p.add_argument("--project", default=".", help="with --base: the git checkout holding recipes/ (default: .)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set validate.gates.max_kl=0.05 (repeatable)")
        p.add_argument("--store", default=None, help="content-addressed store URL (default: $QUANTFAB_STORE or ~/.cache/quantfab/store)")
        p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's own logs")
    ver = sub.add_parser("verify", help="re-hash a published package against its manifest.json (exit 1 on any "
                         "altered, missing or extra file), or with --store every blob of a store")
    ver.add_argument("package", nargs="?", help="the package folder: a path or any fsspec URL")
    ver.add_argument("--store", nargs="?", const="", default=None, metavar="URL",
                     help="check the store instead (default: $QUANTFAB_STORE or ~/.cache/quantfab/store); "
                          "altered blobs are moved aside to its quarantine/ so the next run rebuilds them")
    cmp = sub.add_parser("compare", help="compare two published packages' quality output by output (exit 1 when NEW "
                         "is worse: an output's KL up by more than --threshold and beyond the noise, or one missing)")
    cmp.add_argument("old", help="the earlier package folder: a path or any fsspec URL")
    cmp.add_argument("new", help="the later package folder")
    cmp.add_argument("--threshold", type=float, default=0.10, help="largest allowed relative KL rise (default 0.10)")
    gc = sub.add_parser("gc", help="remove what the retention policy does not keep from the store (see README, "
                        "\"Operating the store\"); safe while other runs use it")
    gc.add_argument("--keep-last", type=int, default=3, metavar="N", help="builds kept per recipe (default 3); "
                    "published packages' builds, pinned builds and live runs are always kept")
    gc.add_argument("--max-size", type=_size, default=None, metavar="SIZE",
                    help="cap the store (e.g. 500G, 800MiB): the oldest of the last N builds go first")
    gc.add_argument("--quarantine-days", type=float, default=14, metavar="D",
                    help="remove moved-aside damaged blobs older than this (default 14)")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed and the space it frees")
    builds = sub.add_parser("builds", help="the store's build history: each run of each recipe, its state, size and pin")
    builds.add_argument("recipe", nargs="*", help="only these recipe names")
    pin = sub.add_parser("pin", help="keep a build's blobs through every gc (--remove to unpin)")
    pin.add_argument("build", help="a build id from `quantfab builds`")
    pin.add_argument("--remove", action="store_true", help="unpin it")
    for p in (gc, builds, pin):
        p.add_argument("--store", default=None, help="content-addressed store URL (default: $QUANTFAB_STORE or ~/.cache/quantfab/store)")
    sub.add_parser("schema", help="print the recipe JSON Schema")
    fam = sub.add_parser("families", help="the model families quantfab builds, and which formats and methods work for each")
    fam.add_argument("--all", action="store_true", help="also list every supported model_type")
    dep = sub.add_parser("deployments", help="prefect.yaml's deployments, one per recipe")
    dep_sub = dep.add_subparsers(dest="action", required=True)
    sync = dep_sub.add_parser("sync", help="rewrite prefect.yaml's recipe deployments from recipes/")
    sync.add_argument("--project", default=".", help="the folder holding prefect.yaml and recipes/ (default: .)")
    sync.add_argument("--check", action="store_true", help="only check; exit 1 if prefect.yaml disagrees")
    args = parser.parse_args(argv)
    if args.command == "schema":
        from quantfab.pipelines.recipe import Recipe

        print(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2))
        return 0
    if args.command == "deployments":
        return _deployments(args)
    if args.command == "verify":
        return _verify(args)
    if args.command == "compare":
        return _compare(args)
    if args.command in ("gc", "builds", "pin"):
        from quantfab.pipelines import store_cli
        from quantfab.tasks.errors import UserError

        try:
            return getattr(store_cli, args.command)(args)
        except UserError as exc:
            console.print(f"[bold red]error:[/] {escape(redact_text(str(exc)))}", highlight=False)
            return 2
    if args.command == "families":
        from quantfab.tasks.families import report

        print(report(args.all))
        return 0
    _quiet_prefect(args.verbose)
    from quantfab.tasks.errors import UserError

    try:
        return _run(args) if args.command == "run" else _plan(args)
    except UserError as exc:
        console.print(f"[bold red]error:[/] {escape(redact_text(str(exc)))}", highlight=False)
        return 2


def _size(text: str) -> int:
    """500G, 800MiB, 1.5T, 1000000 (bytes): binary units, as du -h and the plan's figures are."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = number[-1] if number and number[-1] in units else ""
    try:
        return int(float(number.removesuffix(unit)) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500G, 800MiB, 1.5T)") from None


def _quiet_prefect(verbose: bool) -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
        logging.getLogger("gguf").setLevel(logging.ERROR)  # gguf.vocab warns on every Llama tokenizer


def _run(args: argparse.Namespace) -> int:
    from quantfab.pipelines.recipe_loading import load_recipe

    if len(args.recipe) > 1:
        return _run_many(args)
    recipe = load_recipe(args.recipe[0], args.overrides)  # fail fast, before Prefect starts
    if _reported_up_to_date(recipe, args.store):
        return 0
    from quantfab.pipelines.keys import ORDER
    from quantfab.pipelines.quantize import LISTENERS, NOTICES, quantize
    from quantfab.tasks.errors import QualityGateFailed, VerificationFailed

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        bar = progress.add_task(f"{recipe.name}: starting Prefect", total=len(ORDER))

        def on_stage(stage: str, status: str, seconds: float) -> None:
            progress.console.print(f"  {stage:<10} {status:<6} {seconds:8.2f} s")
            progress.update(bar, advance=1, description=f"{recipe.name}: {stage} {status}")

        def on_notice(text: str) -> None:
            progress.console.print(f"  [yellow]{escape(text)}[/]", highlight=False)

        LISTENERS.append(on_stage)
        NOTICES.append(on_notice)
        try:
            result = quantize(args.recipe[0], args.overrides, args.store)
        except QualityGateFailed as exc:
            print(exc.table)
            console.print(f"[bold red]quality gate failed:[/] {escape('; '.join(exc.failures))}; nothing was published", highlight=False)
            return 1
        except VerificationFailed as exc:
            console.print(f"[bold red]verification failed:[/] {escape('; '.join(exc.failures))}; nothing was published",
                          highlight=False)
            return 1
        finally:
            LISTENERS.remove(on_stage)
            NOTICES.remove(on_notice)
    print(result["table"])
    console.print(f"[green]published[/] {result['destination']}", highlight=False)
    return 0


def _reported_up_to_date(recipe: Any, store_url: str | None) -> bool:
    """Print the build as the flow would and say True when every stage is cached and the package published
    (pipelines/uptodate.py); then neither torch nor Prefect is imported. False: the flow must run."""
    from quantfab.pipelines.uptodate import record_build, up_to_date
    from quantfab.tasks.redact import redact
    from quantfab.tasks.store import Store

    store = Store(store_url)
    stages = up_to_date(recipe, store)
    if stages is None or not record_build(recipe, store, stages):
        return False
    console.print(f"{recipe.name}: up to date (no stage to run, Prefect not started)", highlight=False)
    for stage, cached in stages.items():
        console.print(f"  {stage:<10} {'cached':<6} {cached.seconds:8.2f} s", highlight=False)
    print(stages["validate"].result.table)
    console.print(f"[green]published[/] {escape(redact(recipe.package.destination))}", highlight=False)
    return True


def _run_many(args: argparse.Namespace) -> int:
    from quantfab.pipelines.recipe_loading import check_recipes

    recipes = check_recipes(args.recipe, args.overrides)  # fail fast, before Prefect starts
    stale = [path for path, recipe in zip(args.recipe, recipes) if not _reported_up_to_date(recipe, args.store)]
    if not stale:
        return 0
    from quantfab.pipelines.quantize import quantize_many
    from quantfab.tasks.errors import QualityGateFailed, VerificationFailed

    console.print(f"{len(stale)} recipes on Dask ({args.dask_address or f'LocalCluster of {args.dask_workers}'})",
                  highlight=False)
    try:
        results = quantize_many(stale, args.overrides, args.store, args.dask_address, args.dask_workers)
    except (QualityGateFailed, VerificationFailed) as exc:
        console.print(f"[bold red]failed:[/] {escape(str(exc))}; that recipe published nothing", highlight=False)
        return 1
    for result in results:
        print(f"## {result['recipe']}\n{result['table']}")
        console.print(f"[green]published[/] {result['destination']}", highlight=False)
    return 0


def _deployments(args: argparse.Namespace) -> int:
    from pathlib import Path

    from quantfab.pipelines.deployments import sync
    from quantfab.tasks.errors import UserError

    prefect_yaml = Path(args.project) / "prefect.yaml"
    if not prefect_yaml.is_file():
        console.print(f"[bold red]error:[/] {prefect_yaml}: no such file", highlight=False)
        return 2
    try:
        agrees = sync(prefect_yaml, args.check)
    except UserError as exc:
        console.print(f"[bold red]error:[/] {escape(redact_text(str(exc)))}", highlight=False)
        return 2
    if agrees:
        console.print(f"{prefect_yaml}: deployments agree with recipes/", highlight=False)
        return 0
    if args.check:
        console.print(f"[bold red]{prefect_yaml} disagrees with recipes/:[/] run `quantfab deployments sync`",
                      highlight=False)
        return 1
    console.print(f"{prefect_yaml}: recipe deployments rewritten", highlight=False)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from quantfab.tasks.errors import UserError
    from quantfab.tasks.store import Store
    from quantfab.tasks.verify import verify_package, verify_store

    if (args.package is None) == (args.store is None):
        console.print("[bold red]error:[/] give a package folder, or --store [URL], not both", highlight=False)
        return 2
    try:
        checks = verify_package(args.package) if args.package else verify_store(Store(args.store or None))
    except UserError as exc:
        console.print(f"[bold red]error:[/] {escape(redact_text(str(exc)))}", highlight=False)
        return 2
    for c in checks:
        if c.status == "ok" and not args.package:
            continue  # a store holds thousands of blobs: only the problems, then the counts
        print(f"{c.status:<8} {c.path}{'  ' + redact_text(c.detail) if c.detail else ''}")
    bad = [c for c in checks if c.status != "ok"]
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "altered", "missing", "extra")}
    console.print(f"{'[bold red]' if bad else '[green]'}{len(checks)} files:[/] "
                  + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == "ok"), highlight=False)
    return 1 if bad else 0


def _compare(args: argparse.Namespace) -> int:
    from quantfab.tasks.errors import UserError
    from quantfab.tasks.regression import compare_reports, comparison_table, read_report

    try:
        old, new = read_report(args.old), read_report(args.new)
    except UserError as exc:
        console.print(f"[bold red]error:[/] {escape(redact_text(str(exc)))}", highlight=False)
        return 2
    deltas, regressions = compare_reports(old, new, args.threshold)
    print(comparison_table(old, new, deltas, regressions))
    return 1 if regressions else 0


def _plan(args: argparse.Namespace) -> int:
    from quantfab.pipelines.plan import plan, render
    from quantfab.pipelines.recipe_loading import load_recipe

    if args.base:
        from pathlib import Path

        from quantfab.pipelines import review

        changes = review.review(Path(args.project).resolve(), args.base, args.recipe, args.store)
        render_as = {"text": review.render_text, "markdown": review.render_markdown, "json": review.render_json}
        print(render_as[args.format](changes, args.base))
        return 0
    if len(args.recipe) != 1:
        console.print("[bold red]error:[/] quantfab plan takes one recipe (or --base GIT_REF)", highlight=False)
        return 2
    recipe = load_recipe(args.recipe[0], args.overrides)
    print(render(plan(recipe, args.store)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
