"""Retention: `quantfab gc` keeps exactly what its policy says, and never what a live run holds.

The policy tests build real stores (blobs written through Store, build records through BuildLog, the
locks real flocks); the last test runs real builds with `quantfab run` and collects between them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantfab.pipelines.cli import main
from quantfab.tasks.builds import BuildLog, read_builds
from quantfab.tasks.errors import UserError
from quantfab.tasks.retention import Policy, collect
from quantfab.tasks.store import Blob, Store

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def blob(store: Store, name: str, size: int = 1000) -> Blob:
    return store.put_bytes(hashlib.sha256(name.encode()).digest() * (size // 32) + name.encode()[: size % 32].ljust(size % 32, b"."))


def publish(destination: Path) -> str:
    """A package folder at ``destination`` (only its manifest matters to gc); its manifest's sha256."""
    destination.mkdir(parents=True, exist_ok=True)
    manifest = json.dumps({"files": [], "built": time.time_ns()}).encode()
    (destination / "manifest.json").write_bytes(manifest)
    return hashlib.sha256(manifest).hexdigest()


def build(store: Store, recipe: str, blobs: list[Blob], destination: Path | None = None, status: str = "published") -> str:
    """One finished build of ``recipe`` using ``blobs``; published at ``destination`` if given. Its id."""
    with BuildLog(store, recipe, str(destination or "/nowhere")) as log:
        log.hold("quantize", f"key-{log.record.id}", blobs)
        if status == "published" and destination is not None:
            log.finish("published", publish(destination))
        else:
            log.finish("failed" if status == "failed" else "published", "0" * 64)
    return log.record.id


def present(store: Store, b: Blob) -> bool:
    return store.exists(b)


def test_keep_last_n_per_recipe_and_every_published_package(store: Store, tmp_path: Path) -> None:
    shared = blob(store, "shared")  # a blob two builds use (e.g. the same download)
    a1 = [shared, blob(store, "a1")]
    a2 = [shared, blob(store, "a2")]
    a3 = [shared, blob(store, "a3")]
    b1 = [blob(store, "b1")]
    build(store, "a", a1, tmp_path / "out-a-old")  # its own destination still holds its package: kept
    build(store, "a", a2)
    build(store, "a", a3, status="failed")
    build(store, "b", b1)
    out = collect(store, Policy(keep_last=1))
    verdicts = {v.record.recipe + str(i): (v.keep, v.why) for i, v in enumerate(out.builds)}
    assert [v[0] for v in verdicts.values()] == [True, False, True, True]
    assert verdicts["a0"][1].startswith("published at")
    assert verdicts["a1"][1] == "older than the last 1 of a"
    assert all(present(store, b) for b in a1 + a3 + b1)
    assert not present(store, a2[1])
    assert [r.recipe for r in read_builds(store)] == ["a", "a", "b"]
    assert out.freed == a2[1].size
    assert not store.fs.exists(f"{store.root}/verified/{a2[1].digest[:2]}/{a2[1].digest[2:]}")


def test_a_replaced_package_no_longer_keeps_its_build(store: Store, tmp_path: Path) -> None:
    old, new = [blob(store, "old")], [blob(store, "new")]
    build(store, "a", old, tmp_path / "out")
    build(store, "a", new, tmp_path / "out")  # publishes over the first
    collect(store, Policy(keep_last=1))
    assert not present(store, old[0]) and present(store, new[0])


def test_a_pinned_build_is_kept_until_unpinned(store: Store, tmp_path: Path, capsys) -> None:
    first = build(store, "a", [b := blob(store, "pinned")])
    build(store, "a", [blob(store, "later")])
    assert main(["pin", first, "--store", store.url]) == 0
    collect(store, Policy(keep_last=1))
    assert present(store, b)
    assert main(["pin", "--remove", first, "--store", store.url]) == 0
    collect(store, Policy(keep_last=1))
    assert not present(store, b)
    assert main(["pin", "no-such-build", "--store", store.url]) == 2
    assert "no build 'no-such-build'" in capsys.readouterr().err


def test_a_live_run_keeps_what_it_holds_and_everything_written_since_it_started(store: Store) -> None:
    old = blob(store, "old")
    build(store, "a", [old])
    build(store, "a", [blob(store, "newer")])
    with BuildLog(store, "b", "/nowhere") as live:
        live.hold("download", "k", [old])  # reuses a blob of the build the policy drops
        written = blob(store, "being written")  # written by a stage still running, not recorded yet
        out = collect(store, Policy(keep_last=1))
        assert [v.state for v in out.builds] == ["published", "published", "running"]
        assert present(store, old) and present(store, written)
        live.hold("quantize", "k2", [written])
    assert read_builds(store)[-1].state(store) == "failed"  # left without finish: the run failed


def test_a_blob_removed_before_a_run_records_it_is_reported_for_recompute(store: Store) -> None:
    """The other order of the race: gc removed it first, so recording it says it is gone."""
    dropped = blob(store, "dropped")
    build(store, "a", [dropped])
    build(store, "a", [blob(store, "kept")])
    collect(store, Policy(keep_last=1))
    with BuildLog(store, "a", "/nowhere") as run:
        assert run.hold("quantize", "k", [dropped]) == [dropped]


def test_an_interrupted_build_keeps_its_checkpoints_while_it_is_among_the_last(store: Store) -> None:
    log = BuildLog(store, "a", "/nowhere")
    log.__enter__()
    layer = blob(store, "layer 0")
    store.put_ref("checkpoints", "layer-0", layer)
    log._held.close()  # the process dies: its lock goes, its record stays "running"
    assert read_builds(store)[0].state(store) == "interrupted"
    collect(store, Policy(keep_last=1))
    assert present(store, layer) and store.get_ref("checkpoints", "layer-0") == layer
    time.sleep(0.05)
    build(store, "a", [blob(store, "a later build")])
    collect(store, Policy(keep_last=1))
    assert not present(store, layer) and store.get_ref("checkpoints", "layer-0") is None


def test_max_size_drops_the_oldest_recent_builds_never_a_published_one(store: Store, tmp_path: Path, capsys) -> None:
    published = build(store, "a", [blob(store, "p", 4000)], tmp_path / "out-p")
    ids = [build(store, "a", [blob(store, f"r{i}", 4000)]) for i in range(3)]
    out = collect(store, Policy(keep_last=5, max_size=9000))
    kept = [v.record.id for v in out.builds if v.keep]
    assert kept == [published, ids[2]] and out.size_after == 8000 and not out.unmet
    assert [v.why for v in out.builds if not v.keep] == ["over the size cap (8.8 KiB)"] * 2
    assert main(["gc", "--max-size", "3000", "--store", store.url]) == 1  # the published build alone is larger
    assert "max-size not met" in capsys.readouterr().out


def test_dry_run_removes_nothing(store: Store, tmp_path: Path, capsys) -> None:
    build(store, "a", [blob(store, "one")])
    build(store, "a", [blob(store, "two")])
    before = sorted(p for p in Path(store.root).rglob("*") if "locks" not in p.parts)
    assert main(["gc", "--keep-last", "1", "--dry-run", "--store", store.url]) == 0
    assert sorted(p for p in Path(store.root).rglob("*") if "locks" not in p.parts) == before
    printed = capsys.readouterr().out
    assert "would remove blobs" in printed and "frees 1,000 B" in printed


def test_old_quarantine_and_leftovers_of_killed_runs_go(store: Store) -> None:
    build(store, "a", [b := blob(store, "x")])
    aside = Path(store.root) / "quarantine" / f"{'0' * 64}.20260101T000000Z-abc"
    aside.parent.mkdir(parents=True)
    aside.write_bytes(b"rotten")
    recent_aside = aside.with_name(f"{'1' * 64}.now")
    recent_aside.write_bytes(b"rotten too")
    os.utime(aside, (time.time() - 30 * 86400,) * 2)
    work = Path(store.scratch()) / "work-killed"
    work.write_bytes(b"partial")
    partial = Path(store._key("f" * 64) + ".tmp-dead")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"half a blob")
    collect(store, Policy(keep_last=1))
    assert not aside.exists() and recent_aside.exists()
    assert not work.exists() and not partial.exists() and present(store, b)


def test_a_store_without_build_records_is_refused(store: Store) -> None:
    blob(store, "from an older quantfab")
    with pytest.raises(UserError, match="no build records"):
        collect(store, Policy())


def test_an_object_store_is_collected_the_same_way(tmp_path: Path) -> None:
    import uuid

    store = Store(f"memory://gc-{uuid.uuid4().hex}")
    first = blob(store, "first")
    build(store, "a", [first])
    time.sleep(0.01)
    build(store, "a", [second := blob(store, "second")])
    out = collect(store, Policy(keep_last=1))
    # an object store's timestamps may be skewed: blobs newer than a few minutes stay whatever the policy
    assert [v.keep for v in out.builds] == [False, True] and present(store, first) and present(store, second)


def quantfab(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "quantfab"), *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_gc_between_and_during_real_builds(tmp_path: Path, prefect_env: dict[str, str]) -> None:
    """Two builds publish to one destination; gc keeps the published one whole and cached, the dropped
    one rebuilds from scratch, and gc running over and over during that rebuild takes nothing it needs."""
    store, out = tmp_path / "store", tmp_path / "out"
    env = {**os.environ, **prefect_env, "PREFECT_HOME": str(tmp_path / "home")}
    recipe = tmp_path / "rtn.yaml"
    shutil.copy(REPO / "recipes" / "demo.yaml", tmp_path / "demo.yaml")  # extends: stays inside the recipe's project
    recipe.write_text(f"extends: demo.yaml\nname: demo-rtn\nquantize: {{method: rtn}}\n"
                      f"outputs: [{{gguf: Q8_0}}]\npackage: {{destination: {out}}}\n")
    seeds = [["--set", "model.source=synthetic://llama?layers=2&hidden=128&intermediate=256&heads=2&kv_heads=1"
              f"&vocab=512&seed={s}"] for s in (0, 1)]
    for seed in seeds:
        assert quantfab("run", str(recipe), "--store", str(store), *seed, env=env).returncode == 0
    gc = quantfab("gc", "--keep-last", "1", "--store", str(store), env=env)
    assert gc.returncode == 0, gc.stderr
    assert "drop: older than the last 1 of demo-rtn" in gc.stdout and "keep: published at" in gc.stdout
    assert quantfab("verify", str(out), env=env).returncode == 0
    again = quantfab("run", str(recipe), "--store", str(store), *seeds[1], env=env)
    assert again.returncode == 0 and again.stderr.count(" cached ") == 7, again.stderr

    rebuild = subprocess.Popen([str(Path(sys.executable).parent / "quantfab"), "run", str(recipe), "--store",
                                str(store), *seeds[0]], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    collections = 0
    while rebuild.poll() is None:
        collect(Store(str(store)), Policy(keep_last=1))
        collections += 1
        time.sleep(0.2)
    stdout, stderr = rebuild.communicate()
    assert rebuild.returncode == 0 and stderr.count(" ran ") == 7, stderr
    assert collections > 10
    assert quantfab("verify", str(out), env=env).returncode == 0
    assert quantfab("verify", "--store", str(store), env=env).returncode == 0
    assert [r.state(Store(str(store))) for r in read_builds(Store(str(store)))][-1] == "published"


def test_the_gc_flow_collects_and_its_deployment_runs_after_each_build(store: Store) -> None:
    import yaml
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    from quantfab.pipelines.retention import gc as gc_flow

    build(store, "a", [old := blob(store, "old")])
    build(store, "a", [blob(store, "new")])
    assert gc_flow(store=store.url, keep_last=1) == {"freed": old.size, "size_after": 1000}
    assert not present(store, old)
    deployment = next(d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
                      if d["name"] == "store-gc")
    assert deployment["entrypoint"] == "quantfab.pipelines.retention:gc"
    (trigger,) = _initialize_deployment_triggers("gc/store-gc", deployment["triggers"])
    assert trigger.expect == {"prefect.flow-run.Completed"}
    assert trigger.match_related.root == {"prefect.resource.name": "quantize", "prefect.resource.role": "flow"}
