"""plan's memory estimate: what each stage holds at its peak, from the headers. Its accuracy is measured by
bench/end_to_end_1b.py (a 1.1B model, predicted beside measured); here, that its terms follow the stages' design."""

from __future__ import annotations

from pathlib import Path

from quantfab.pipelines.plan import RUNTIME, plan, render
from quantfab.pipelines.recipe_loading import load_recipe

REPO = Path(__file__).resolve().parent.parent
MODEL = "synthetic://llama?layers=2&hidden=256&intermediate=512&heads=4&kv_heads=2&vocab=4096&seed=0"
SMALL = [f"model.source={MODEL}", "calibration.samples=4", "calibration.seq_len=32", "validate.window=64",
         "calibration.source=synthetic://tokens", "validate.source=synthetic://tokens", "quantize.method=rtn",
         "outputs=[{gguf: Q8_0}]"]


def memory(tmp_path: Path, *more: str):
    return plan(load_recipe(REPO / "recipes" / "demo.yaml", [*SMALL, *more]), str(tmp_path / "store"))


def test_validate_memory_grows_with_the_hidden_states_of_its_tokens_not_with_vocab_times_tokens(tmp_path: Path) -> None:
    few, many = memory(tmp_path, "validate.tokens=256"), memory(tmp_path, "validate.tokens=4096")
    models, hidden = 2, 256  # the unquantized model beside the one output
    assert many.memory["validate"] - few.memory["validate"] == models * 4 * (4096 - 256) * hidden


def test_rtn_plans_no_calibration_memory_unless_the_module_report_is_asked(tmp_path: Path) -> None:
    assert memory(tmp_path).memory["calibrate"] == 0
    report = memory(tmp_path, "quantize.module_report=true")
    assert report.statistics and report.memory["calibrate"] > 4 * 4096 * 256  # the embedding and more


def test_the_runs_peak_rss_is_the_process_and_the_largest_stage_that_runs(tmp_path: Path) -> None:
    p = memory(tmp_path)
    assert p.peak_rss == RUNTIME + max(p.memory.values())
    assert f"peak RSS of this run ~{p.peak_rss / 2**20:,.0f} MiB" in render(p)


def test_a_sequential_method_plans_for_its_calibration_tokens_and_rtn_does_not(tmp_path: Path) -> None:
    """GPTQ carries every calibration token's hidden states in and out, and parks every batch at its widest
    Linear input (the MLP's 512 here) with two hidden-wide states each; rtn reads weights alone, so its
    quantize estimate does not move with the calibration size."""
    def quantize(method: str, samples: int) -> int:
        return memory(tmp_path, f"quantize.method={method}", f"calibration.samples={samples}").memory["quantize"]

    hidden, widest, seq = 256, 512, 32
    assert quantize("gptq", 8) - quantize("gptq", 4) == 4 * seq * 4 * (4 * hidden + widest)
    assert quantize("rtn", 8) == quantize("rtn", 4)
    assert quantize("gptq", 4) > quantize("rtn", 4)
