"""Regressions against the last build: `quantfab compare OLD NEW` and the max_regression gate, which keeps a worse
build from replacing the package at its destination (issue #25)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantfab.pipelines.cli import main
from quantfab.tasks.errors import QualityGateFailed
from quantfab.tasks.manifests import ConvertManifest, FormatFile, ModelManifest, QualityManifest, Verification
from quantfab.tasks.package import package
from quantfab.tasks.regression import compare_reports
from quantfab.tasks.store import Store


def report(kl: float, kl_se: float = 0.001, outputs: tuple[str, ...] = ("gguf-Q4_0",)) -> dict:
    figures = {"kl_divergence": kl, "kl_divergence_se": kl_se, "top1_agreement": 0.8, "top1_agreement_se": 0.01,
               "ppl_increase": 0.02, "ln_ppl_ratio": 0.0198, "ln_ppl_ratio_se": 0.005}
    return {"protocol": {"tokens": 1000, "windows": 4, "window": 251, "tokens_sha256": "ab" * 32},
            "outputs": {key: dict(figures) for key in outputs}}


@pytest.mark.parametrize("new, regressed", [
    (report(0.050), False),  # identical
    (report(0.054), False),  # +8 %: within the 10 % threshold
    (report(0.060), True),  # +20 %, 7 errors of the difference
    (report(0.060, kl_se=0.01), False),  # +20 %, but within the noise
    (report(0.040), False),  # better
    (report(0.050, outputs=("gguf-Q8_0",)), True),  # the old output is gone
])
def test_an_output_regresses_past_the_threshold_and_beyond_the_noise(new: dict, regressed: bool) -> None:
    deltas, regressions = compare_reports(report(0.050), new, 0.10)
    assert bool(regressions) is regressed, regressions
    kl = [d for d in deltas if d.metric == "kl_divergence"]
    if "gguf-Q4_0" in new["outputs"]:
        assert kl[0].delta == pytest.approx(new["outputs"]["gguf-Q4_0"]["kl_divergence"] - 0.050)
        assert kl[0].se == pytest.approx((0.001 ** 2 + new["outputs"]["gguf-Q4_0"]["kl_divergence_se"] ** 2) ** 0.5)


def write_package(folder: Path, quality: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "quality.json").write_text(json.dumps(quality))
    return folder


def test_compare_prints_every_figure_and_exits_1_on_a_regression(tmp_path: Path, capsys) -> None:
    old = write_package(tmp_path / "old", report(0.050))
    same = write_package(tmp_path / "same", report(0.050))
    worse = write_package(tmp_path / "worse", report(0.070))
    assert main(["compare", str(old), str(same)]) == 0
    out = capsys.readouterr().out
    assert "| gguf-Q4_0 | KL | 0.05000 | 0.05000 | +0 ± 0.0014 |" in out and "regressions: none" in out
    assert "evaluated on the same tokens" in out
    assert main(["compare", str(old), str(worse)]) == 1
    assert "gguf-Q4_0: KL 0.05000 -> 0.07000 (+40.0% ± 2.8%)" in capsys.readouterr().out
    assert main(["compare", str(old), str(tmp_path / "nowhere")]) == 2
    assert "no quality.json" in capsys.readouterr().err


def inputs(store: Store, kl: float) -> tuple[ModelManifest, ConvertManifest, QualityManifest]:
    blob = store.put_bytes(f"weights {kl}".encode())
    verification = Verification(backend="numpy", tensors=0, elements=0, max_abs_error=0.0, mismatches=[])
    fmt = FormatFile(output="gguf-Q4_0", path="m.gguf", files={"m.gguf": blob}, tensor_types={}, fallbacks=[],
                     bits_per_weight=4.5, nominal_bits_per_weight=4.5, verification=verification)
    model = ModelManifest(source="synthetic://llama", revision="r", files={}, model_type="llama", num_layers=1,
                          parameters=1)
    quality = QualityManifest(report=store.put_bytes(json.dumps(report(kl)).encode()), passed=True, table="",
                              failures=[])
    return model, ConvertManifest(files={"gguf-Q4_0": fmt}), quality


def test_max_regression_keeps_the_better_package_in_place(tmp_path: Path) -> None:
    """The first build publishes; a worse one is refused with the comparison and the destination keeps the first;
    one within the threshold replaces it, and its manifest carries the comparison (the flow's artifact)."""
    store, dest = Store(str(tmp_path / "store")), tmp_path / "dest"
    assert package("x", *inputs(store, 0.050), "name: x\n", "d", str(dest), "0", store,
                   max_regression=0.10).comparison == ""  # nothing to compare with
    first = (dest / "manifest.json").read_bytes()
    with pytest.raises(QualityGateFailed) as failed:
        package("x", *inputs(store, 0.080), "name: x\n", "d", str(dest), "0", store, max_regression=0.10)
    assert "max_regression 0.1 against the package at" in failed.value.failures[0]
    assert "| gguf-Q4_0 | KL | 0.05000 | 0.08000 |" in failed.value.table
    assert (dest / "manifest.json").read_bytes() == first
    assert package("x", *inputs(store, 0.052), "name: x\n", "d", str(dest), "0", store,
                   max_regression=0.10).comparison.startswith("| output | figure | old | new |")
    assert json.loads((dest / "quality.json").read_text())["outputs"]["gguf-Q4_0"]["kl_divergence"] == 0.052
