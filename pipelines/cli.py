"""The `quantfab` command: run, plan, schema, families and deployments.

Exit codes: 0 built, 1 a quality gate or the verification of packed tensors failed (nothing published), 2 bad
input (message, no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from rich.console import Console
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
    if args.command == "families":
        from quantfab.tasks.families import report

        print(report(args.all))
        return 0
    _quiet_prefect(args.verbose)
    from quantfab.tasks.errors import UserError

    try:
        return _run(args) if args.command == "run" else _plan(args)
    except UserError as exc:
        console.print(f"[bold red]error:[/] {redact_text(str(exc))}", highlight=False)
        return 2


def _quiet_prefect(verbose: bool) -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
        logging.getLogger("gguf").setLevel(logging.ERROR)  # gguf.vocab warns on every Llama tokenizer


def _run(args: argparse.Namespace) -> int:
    from quantfab.pipelines.quantize import LISTENERS, ORDER, quantize
    from quantfab.pipelines.recipe_loading import load_recipe
    from quantfab.tasks.errors import QualityGateFailed, VerificationFailed

    if len(args.recipe) > 1:
        return _run_many(args)
    recipe = load_recipe(args.recipe[0], args.overrides)  # fail fast, before Prefect starts
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        bar = progress.add_task(f"{recipe.name}: starting Prefect", total=len(ORDER))

        def on_stage(stage: str, status: str, seconds: float) -> None:
            progress.console.print(f"  {stage:<10} {status:<6} {seconds:8.2f} s")
            progress.update(bar, advance=1, description=f"{recipe.name}: {stage} {status}")

        LISTENERS.append(on_stage)
        try:
            result = quantize(args.recipe[0], args.overrides, args.store)
        except QualityGateFailed as exc:
            print(exc.table)
            console.print(f"[bold red]quality gate failed:[/] {'; '.join(exc.failures)}; nothing was published", highlight=False)
            return 1
        except VerificationFailed as exc:
            console.print(f"[bold red]verification failed:[/] {'; '.join(exc.failures)}; nothing was published",
                          highlight=False)
            return 1
        finally:
            LISTENERS.remove(on_stage)
    print(result["table"])
    console.print(f"[green]published[/] {result['destination']}", highlight=False)
    return 0


def _run_many(args: argparse.Namespace) -> int:
    from quantfab.pipelines.quantize import check_recipes, quantize_many
    from quantfab.tasks.errors import QualityGateFailed, VerificationFailed

    check_recipes(args.recipe, args.overrides)  # fail fast, before Prefect starts
    console.print(f"{len(args.recipe)} recipes on Dask ({args.dask_address or f'LocalCluster of {args.dask_workers}'})",
                  highlight=False)
    try:
        results = quantize_many(args.recipe, args.overrides, args.store, args.dask_address, args.dask_workers)
    except (QualityGateFailed, VerificationFailed) as exc:
        console.print(f"[bold red]failed:[/] {exc}; that recipe published nothing", highlight=False)
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
        console.print(f"[bold red]error:[/] {redact_text(str(exc))}", highlight=False)
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
