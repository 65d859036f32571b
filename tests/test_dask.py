"""execution.runner: dask: the demo on a 2-worker LocalCluster ships the same bytes as the local runner
(every weight, config and tokenizer file; the quality report equal to float32 rounding).

Both runs build from scratch (a store each) in this process's ephemeral Prefect API. On Dask every
stage is submitted to prefect-dask's DaskTaskRunner and spreads its independent items (per-layer
quantize of the demo's non-sequential method, per-output convert) over the workers; the test also checks
that those items ran in more than one worker process.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from quantfab.pipelines.quantize import quantize

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.yaml"


def build(tmp_path: Path, name: str, runner: list[str]) -> tuple[dict[str, str], dict, float]:
    out = tmp_path / name / "out"
    t0 = time.perf_counter()
    result = quantize(str(DEMO), [f"package.destination={out}", *runner], str(tmp_path / name / "store"))
    seconds = time.perf_counter() - t0
    manifest = json.loads((out / "manifest.json").read_text())
    return {f["path"]: f["sha256"] for f in manifest["files"]}, result, seconds


def flat(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()}
    return {prefix: value}


def spread_logs() -> list[str]:
    """What pmap logged to the task runs: '<fn>: N items over M Dask workers (...)'."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs() if "Dask workers" in log.message]


@pytest.mark.slow
def test_dask_runner_ships_the_same_bytes_as_the_local_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("prefect_dask")
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "INFO")  # the worker processes, started below, log pmap's spread
    local, local_result, local_s = build(tmp_path, "local", [])
    on_dask, dask_result, dask_s = build(tmp_path, "dask", ["execution.runner=dask", "execution.dask_workers=2"])
    assert set(local_result["stages"].values()) == set(dask_result["stages"].values()) == {"ran"}
    assert on_dask.keys() == local.keys()
    reports = ("README.md", "quality.json")  # the model card quotes the recipe (its execution differs here)
    assert {k: v for k, v in on_dask.items() if k not in reports} == {k: v for k, v in local.items() if k not in reports}
    # validate's metrics are float sums whose order follows the BLAS thread count (Dask workers run one
    # thread, the local run as many as the machine has): equal to float32 rounding, not always bit for bit
    ours, theirs = flat(dask_result["quality"]), flat(local_result["quality"])
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        is_float = isinstance(value, float)
        assert ours[key] == (pytest.approx(value, rel=1e-5, abs=1e-9) if is_float else value), key
    deadline = time.monotonic() + 30  # worker processes ship their logs to the API in batches
    while not any(m.startswith("convert_output: 3 items over 2") for m in spread_logs()) and time.monotonic() < deadline:
        time.sleep(1)
    logs = spread_logs()
    assert any(m.startswith("quantize_independent_layer: 4 items over 2 Dask workers") for m in logs), logs
    assert any(m.startswith("convert_output: 3 items over 2 Dask workers") for m in logs), logs
    print(f"demo: local runner {local_s:.1f} s, Dask LocalCluster (2 workers) {dask_s:.1f} s")


VARIANT = """\
extends: {demo}
name: demo-rtn
quantize: {{method: rtn}}
outputs: [{{gguf: Q8_0}}]
package: {{destination: "${{QUANTFAB_OUT}}/{dest}"}}
"""


@pytest.mark.slow
def test_several_recipes_at_once_on_one_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`quantfab run a.yaml b.yaml`: each recipe's flow on a worker; the demo's files as the local runner's."""
    pytest.importorskip("prefect_dask")
    from quantfab.pipelines.cli import main

    monkeypatch.setenv("QUANTFAB_OUT", str(tmp_path / "many"))  # read by each recipe's destination
    variant = tmp_path / "recipes" / "demo-rtn.yaml"
    variant.parent.mkdir()
    shutil.copy(DEMO, variant.parent / "demo.yaml")  # extends: stays inside the recipe's project
    variant.write_text(VARIANT.format(demo="demo.yaml", dest="demo"))
    assert main(["run", str(DEMO), str(variant)]) == 2  # one destination for two recipes: refused up front
    variant.write_text(VARIANT.format(demo="demo.yaml", dest="demo-rtn"))
    local, _, _ = build(tmp_path, "local", [])
    t0 = time.perf_counter()
    assert main(["run", str(DEMO), str(variant), "--store", str(tmp_path / "many-store"), "--dask-workers", "2"]) == 0
    seconds = time.perf_counter() - t0
    manifests = {name: json.loads((tmp_path / "many" / name / "manifest.json").read_text()) for name in ("demo", "demo-rtn")}
    demo = {f["path"]: f["sha256"] for f in manifests["demo"]["files"]}
    reports = ("README.md", "quality.json")
    assert {k: v for k, v in demo.items() if k not in reports} == {k: v for k, v in local.items() if k not in reports}
    assert sorted(manifests["demo-rtn"]["formats"]) == ["gguf-Q8_0"] and manifests["demo-rtn"]["passed"]
    print(f"two recipes on a 2-worker LocalCluster: {seconds:.1f} s")
