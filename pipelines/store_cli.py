"""`quantfab gc`, `builds` and `pin`: the store's history and retention, as the CLI and the gc flow print them."""

from __future__ import annotations

import argparse
import time

from quantfab.tasks.builds import BuildRecord, pin_path, pinned, read_builds
from quantfab.tasks.errors import UserError
from quantfab.tasks.retention import Collection, Policy, collect, human
from quantfab.tasks.store import Store


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def render(out: Collection, dry_run: bool) -> str:
    """Each build kept or dropped with why, then what goes and the space it frees."""
    lines = [f"{'build':<34} {'recipe':<28} {'state':<12} {'size':>12}  verdict"]
    for v in out.builds:
        lines.append(f"{v.record.id:<34} {v.record.recipe:<28} {v.state:<12} {human(v.size):>12}  "
                     f"{'keep' if v.keep else 'drop'}: {v.why}")
    counts = ", ".join(f"{len(files)} {kind}" for kind, files in out.removed.items() if files) or "nothing"
    lines.append(f"{'would remove' if dry_run else 'removed'} {counts}; "
                 f"{'frees' if dry_run else 'freed'} {human(out.freed)} "
                 f"(blobs {human(out.size_before)} -> {human(out.size_after)})")
    if out.unmet:
        lines.append(f"max-size not met: {out.unmet}")
    return "\n".join(lines)


def gc(args: argparse.Namespace) -> int:
    policy = Policy(keep_last=args.keep_last, max_size=args.max_size, quarantine_days=args.quarantine_days)
    out = collect(Store(args.store), policy, args.dry_run)
    if args.dry_run:
        for kind, files in out.removed.items():
            for path, size in files:
                print(f"would remove {kind:<11} {path}" + (f"  ({human(size)})" if size else ""))
    print(render(out, args.dry_run))
    return 1 if out.unmet else 0


def _row(record: BuildRecord, store: Store, pins: set[str]) -> str:
    size = sum(record.blobs.values())
    return (f"{record.id:<34} {record.recipe:<28} {record.state(store):<12} {_when(record.started)}  "
            f"{human(size):>12}  {'pinned' if record.id in pins else ''}")


def builds(args: argparse.Namespace) -> int:
    store = Store(args.store)
    pins = pinned(store)
    records = [r for r in read_builds(store) if not args.recipe or r.recipe in args.recipe]
    print(f"{'build':<34} {'recipe':<28} {'state':<12} {'started (UTC)':<17} {'size':>12}")
    for record in records:
        print(_row(record, store, pins))
    return 0


def pin(args: argparse.Namespace) -> int:
    store = Store(args.store)
    if args.build not in {r.id for r in read_builds(store)}:
        raise UserError(f"no build {args.build!r} in the store {store.url}: `quantfab builds` lists them")
    path = pin_path(store, args.build)
    if args.remove:
        if store.fs.exists(path):
            store.fs.rm(path)
        print(f"unpinned {args.build}")
    else:
        store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        store.fs.pipe_file(path, b"")
        print(f"pinned {args.build}: gc keeps its blobs until `quantfab pin --remove {args.build}`")
    return 0
