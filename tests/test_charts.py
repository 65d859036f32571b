"""The package's pictures (issue #25): size against KL with one point and interval per output, and each output's
per-module error as a layer × module heatmap, as PNGs that open and come out the same for the same report."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from quantfab.tasks.charts import charts, module_error_grid, size_kl_figure
from quantfab.tasks.gates import Z95


def report() -> dict:
    modules = [{"name": f"model.layers.{i}.{kind}", "grid": "Q4_0", "relative_output_error": 0.01 * (i + 1) * k}
               for i in range(3) for k, kind in enumerate(("self_attn.q_proj", "mlp.down_proj"), start=1)]
    modules += [{"name": "model.layers.0.mlp.experts.0.up_proj", "grid": "Q4_0", "relative_output_error": 0.02},
                {"name": "model.layers.0.mlp.experts.1.up_proj", "grid": "Q4_0", "relative_output_error": 0.04},
                {"name": "model.layers.1.mlp.gate", "grid": None, "relative_output_error": None}]
    return {"protocol": {"tokens": 1000},
            "outputs": {"gguf-Q4_0": {"bits_per_weight": 4.6, "kl_divergence": 0.05, "kl_divergence_se": 0.002,
                                      "modules": modules},
                        "gguf-Q8_0": {"bits_per_weight": 8.5, "kl_divergence": 0.001, "kl_divergence_se": 0.0001,
                                      "modules": []},
                        "mlx-int4-g64": {"bits_per_weight": 5.1, "kl_divergence": 0.1, "kl_divergence_se": 0.004}}}


def test_size_against_kl_has_one_point_and_95_interval_per_output() -> None:
    fig = size_kl_figure(report())
    ax = fig.axes[0]
    bars = ax.containers
    assert len(bars) == 3
    points = sorted((float(b.lines[0].get_xdata()[0]), float(b.lines[0].get_ydata()[0])) for b in bars)
    assert points == [(4.6, 0.05), (5.1, 0.1), (8.5, 0.001)]
    low, high = (float(cap.get_ydata()[0]) for cap in bars[0].lines[1])  # the Q4_0 point's caps
    assert math.isclose(low, 0.05 - Z95 * 0.002) and math.isclose(high, 0.05 + Z95 * 0.002)
    assert ax.get_yscale() == "log"  # KL spans 100x


def test_the_module_grid_is_layers_by_kinds_with_experts_averaged() -> None:
    layers, kinds, grid = module_error_grid(report()["outputs"]["gguf-Q4_0"]["modules"])
    assert layers == [0, 1, 2] and kinds == ["mlp.down_proj", "mlp.experts.*.up_proj", "self_attn.q_proj"]
    assert np.allclose(grid[:, 0], [0.02, 0.04, 0.06]) and np.allclose(grid[:, 2], [0.01, 0.02, 0.03])
    assert math.isclose(grid[0, 1], 0.03) and np.isnan(grid[1, 1]) and np.isnan(grid[2, 1])
    assert module_error_grid([{"name": "model.layers.0.x", "relative_output_error": None}]) is None


def test_the_charts_are_pngs_that_repeat_byte_for_byte() -> None:
    first, again = charts(report()), charts(report())
    assert sorted(first) == ["charts/gguf-Q4_0-module-error.png", "charts/size-vs-kl.png"]  # Q8_0 has no modules
    assert first == again
    with Image.open(io.BytesIO(first["charts/size-vs-kl.png"])) as image:
        assert image.format == "PNG" and image.size == (700, 450)
    with Image.open(io.BytesIO(first["charts/gguf-Q4_0-module-error.png"])) as image:
        assert image.format == "PNG"
    assert charts({"outputs": {"x": {"bits_per_weight": 4.0}}}) == {}  # no KL measured, no modules: no chart
