"""Speed beside quality (validate.speed): llama.cpp's llama-bench on each GGUF output and an F16 reference, where
llama-bench is installed; a report that says so where it is not (issue #25)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from quantfab.pipelines.keys import cache_key, stage_inputs
from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks import validate as validate_mod
from quantfab.tasks.manifests import ModelManifest
from quantfab.tasks.speed import REFERENCE, tool_digest
from quantfab.tasks.store import Store

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tinystories-656k-q4_0.yaml"
SMALL = ["quantize.method=rtn", "calibration.samples=8", "calibration.seq_len=64", "validate.tokens=512",
         "validate.window=128", "outputs=[{gguf: Q8_0}, {gguf: Q4_0}]"]


def run_validate(tmp_path: Path, stages, speed: str) -> tuple[dict, str]:
    r = load_recipe(RECIPE, [*SMALL, f"validate.speed={speed}"])
    store = Store(str(tmp_path / "store"))
    built = stages(r, store)
    quality = validate_mod.validate(built.model, built.converted, built.quantized, list(r.outputs), r.validate_, {},
                                    tool_digest(), "cpu", store)
    return json.loads(store.read_bytes(quality.report)), quality.table


@pytest.mark.llama_cpp
def test_llama_bench_measures_every_gguf_output_and_the_f16_reference(data_dir: Path, tmp_path: Path, stages,
                                                                      monkeypatch) -> None:
    """The real llama-bench on TinyStories-656K's Q8_0 and Q4_0 files and an F16 file of the float model: positive
    pp and tg rates with their spread over the repetitions, the build and threads it ran with, one table row each."""
    folder = os.environ.get("QUANTFAB_LLAMA_CPP_TOOLS")
    if not folder or not (Path(folder) / "llama-bench").is_file():
        pytest.skip("llama-bench not built: set QUANTFAB_LLAMA_CPP_TOOLS (bench/consumers/build_llama_cpp_tools.sh)")
    report, table = run_validate(tmp_path, stages, "{prompt_tokens: 64, generated_tokens: 16, repetitions: 2, "
                                                   "threads: 1}")
    speed = report["speed"]
    assert speed["settings"] == {"prompt_tokens": 64, "generated_tokens": 16, "repetitions": 2}
    assert speed["machine"]["n_threads"] == 1 and speed["machine"]["build_commit"]
    assert 16 < speed["reference"]["bits_per_weight"] < 17  # F16 weights, F32 norms
    for figures in [speed["reference"]] + [report["outputs"][k]["speed"] for k in ("gguf-Q8_0", "gguf-Q4_0")]:
        assert figures["prompt_tokens_per_s"] > 0 and figures["generation_tokens_per_s"] > 0
        assert figures["prompt_tokens_per_s_sd"] >= 0 and figures["generation_tokens_per_s_sd"] >= 0
    assert f"| {REFERENCE} | " in table and "| gguf-Q4_0 | 6.743 | " in table and "pp64 tokens/s" in table


def test_without_llama_bench_the_report_says_speed_was_not_measured(data_dir: Path, tmp_path: Path, stages,
                                                                   monkeypatch) -> None:
    monkeypatch.setenv("QUANTFAB_LLAMA_CPP_TOOLS", str(tmp_path / "no-tools"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    report, table = run_validate(tmp_path, stages, "{}")
    assert report["speed"]["skipped"].startswith("llama-bench not found")
    assert report["passed"] and not any("speed" in m for m in report["outputs"].values())
    assert "Speed: not measured: llama-bench not found" in table


def test_the_validate_key_follows_the_llama_bench_it_would_run(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A rebuilt llama-bench (other bytes) keys validate anew, so its speeds are measured again; without speed
    the tool does not enter the key."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "llama-bench").write_bytes(b"build 1")
    monkeypatch.setenv("QUANTFAB_LLAMA_CPP_TOOLS", str(tools))
    up = {"download": ModelManifest(source="x", revision="r", files={}, model_type="llama", num_layers=2,
                                    parameters=1), "convert": None, "quantize": None}
    with_speed = load_recipe(RECIPE, ["validate.speed={}"])
    first = cache_key("validate", stage_inputs("validate", with_speed, "store", up))
    (tools / "llama-bench").write_bytes(b"build 2")
    assert cache_key("validate", stage_inputs("validate", with_speed, "store", up)) != first
    assert stage_inputs("validate", load_recipe(RECIPE), "store", up)["speed_tool"] is None


def test_a_build_without_gguf_outputs_says_there_was_nothing_to_measure(data_dir: Path, tmp_path: Path,
                                                                        stages) -> None:
    """speed is asked on a recipe whose outputs (here overridden) hold no GGUF: the report says so."""
    r = load_recipe(RECIPE, [*SMALL, "validate.speed={}", "outputs=[{mlx: int8}]"])
    store = Store(str(tmp_path / "store"))
    built = stages(r, store)
    quality = validate_mod.validate(built.model, built.converted, built.quantized, list(r.outputs), r.validate_, {},
                                    tool_digest(), "cpu", store)
    assert "Speed: not measured: no GGUF output (llama-bench measures GGUF files)" in quality.table
