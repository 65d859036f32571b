"""Two cold runs of one recipe, each into a fresh store, publish files with the same sha256, every one of
them: GGUF files with their metadata in the same order, quality.json, the model card and manifest.json;
and every blob of their stores (calibration statistics, layer files) is the same."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from quantfab.pipelines.quantize import quantize

REPO = Path(__file__).resolve().parent.parent


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_cold_runs_publish_identical_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    published = []
    for run in ("first", "second"):
        result = quantize(str(REPO / "recipes" / "demo.yaml"), [f"package.destination={out}"], str(tmp_path / run))
        assert set(result["stages"].values()) == {"ran"}  # a fresh store: nothing cached
        published.append(digests(out))
        shutil.rmtree(out)
    assert published[0] == published[1]
    # every stage's outputs, not only the published ones: a cache key downstream hashes their digests
    assert digests(tmp_path / "first" / "blobs") == digests(tmp_path / "second" / "blobs")
    assert {"manifest.json", "quality.json", "README.md"} <= set(published[0])
    assert sum(name.endswith(".gguf") and not name.endswith(".imatrix.gguf") for name in published[0]) == 3
    assert sum(name.endswith(".imatrix.gguf") for name in published[0]) == 2  # Q4_0's and Q4_1's, not Q8_0's
