"""A damaged store or package found by a real run (Prefect, the demo recipe) and rebuilt, never published.

The issue's case first: one byte altered in the middle of a GGUF file inside the store, the published
folder removed, the recipe run again. Every cached stage's blobs are checked; the altered one is moved
aside, the stage that made it reruns, and the package published equals the first build's, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from quantfab.pipelines.quantize import LISTENERS, NOTICES, quantize
from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.pipelines.uptodate import up_to_date
from quantfab.tasks.store import Store

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "demo.yaml")


def run(root: Path) -> tuple[dict[str, str], list[str]]:
    """The flow, which repairs; before it, the up-to-date check `quantfab run` makes must not vouch for the
    damage, and after it, the repaired build must be up to date again."""
    assert not fresh(root)
    seen: dict[str, str] = {}
    notices: list[str] = []
    listener = lambda stage, status, _s: seen.__setitem__(stage, status)  # noqa: E731
    LISTENERS.append(listener)
    NOTICES.append(notices.append)
    try:
        quantize(RECIPE, [f"package.destination={root / 'out'}"], str(root / "store"))
    finally:
        LISTENERS.remove(listener)
        NOTICES.remove(notices.append)
    assert fresh(root)
    return seen, notices


def fresh(root: Path) -> bool:
    """What `quantfab run` checks before starting Prefect: every stage cached and usable, the package published."""
    recipe = load_recipe(RECIPE, [f"package.destination={root / 'out'}"])
    return up_to_date(recipe, Store(str(root / "store"))) is not None


def files(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file()}  # charts/ included


def whole(out: Path) -> bool:
    listed = {f["path"]: f["sha256"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    return listed == {k: v for k, v in files(out).items() if k != "manifest.json"}


def cached_manifest(store: Path, kind: str) -> dict:
    """The newest cached stage result of this class (Prefect's result records, JSON)."""
    records = sorted((store / "results").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for record in records:
        result = json.loads(json.loads(record.read_text())["result"])
        if isinstance(result, dict) and result.get("__class__", "").endswith(kind):
            return result["data"]
    raise AssertionError(f"no cached {kind}")


def blob_path(root: Path, digest: str) -> Path:
    return Path(Store(str(root / "store"))._key(digest))


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, prefect_env) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("repair")
    stages, _ = run(root)
    assert set(stages.values()) == {"ran"}
    return root, files(root / "out")


def gguf_digest(root: Path) -> str:
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    return next(f["sha256"] for f in manifest["files"] if f["path"].endswith("Q4_0.gguf"))


def test_a_byte_altered_in_a_stored_gguf_is_never_published(first, damage) -> None:
    root, published = first
    digest = gguf_digest(root)
    damage.flip(blob_path(root, digest))
    shutil.rmtree(root / "out")
    stages, notices = run(root)
    assert stages == {"download": "cached", "calibrate": "cached", "allocate": "cached", "quantize": "cached",
                      "convert": "ran", "validate": "cached", "package": "ran"}
    assert any(f"demo-Q4_0.gguf (sha256 {digest}): altered" in n and "moved aside" in n for n in notices), notices
    assert files(root / "out") == published and whole(root / "out")
    assert any(p.name.startswith(digest) for p in (root / "store" / "quarantine").iterdir())


def test_bit_rot_under_an_unchanged_stamp_is_caught_by_the_copy_out(first, damage) -> None:
    root, published = first
    digest = gguf_digest(root)
    damage.rot(Store(str(root / "store")), digest)
    damage.forget_hashes()
    (root / "out" / "manifest.json").unlink()  # the package must be published again, from the store
    stages, notices = run(root)
    assert any(n.startswith("package could not read convert's files/gguf-Q4_0/files/demo-Q4_0.gguf") for n in notices), notices
    assert stages["convert"] == "ran" and stages["package"] == "ran"
    assert files(root / "out") == published and whole(root / "out")


def test_a_truncated_layer_file_reruns_quantize_only(first) -> None:
    root, published = first
    layer = cached_manifest(root / "store", "QuantizeManifest")["outputs"]["gguf-Q4_0"]["layers"][2]
    os.truncate(blob_path(root, layer["digest"]), layer["size"] // 2)
    stages, notices = run(root)
    assert stages["quantize"] == "ran" and stages["convert"] == "cached"  # the rebuilt file is the same file
    assert any("outputs/gguf-Q4_0/layers/2" in n and "truncated" in n for n in notices), notices
    assert files(root / "out") == published


def test_a_missing_statistics_file_reruns_calibrate_only(first) -> None:
    root, published = first
    stats = cached_manifest(root / "store", "CalibrationManifest")["stats"][1]
    blob_path(root, stats["digest"]).unlink()
    stages, notices = run(root)
    assert stages["calibrate"] == "ran" and stages["quantize"] == "cached"
    assert any("stats/1" in n and "missing from the store" in n for n in notices), notices
    assert files(root / "out") == published


def test_an_altered_published_file_is_replaced(first, damage) -> None:
    root, published = first
    damage.flip(root / "out" / "demo-Q8_0.gguf", at=1000)
    stages, notices = run(root)
    assert stages["package"] == "ran" and stages["convert"] == "cached"
    assert any("demo-Q8_0.gguf no longer matches its sha256 in manifest.json" in n for n in notices), notices
    assert files(root / "out") == published
