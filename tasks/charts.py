"""The build's pictures (issue #25): size against KL for every output, and each output's per-module error as a
layer × module heatmap, as PNG bytes from quality.json alone.

Drawn on matplotlib's Agg canvas without pyplot (no global figure state, no display), and saved without the
software tag, so the same report gives the same bytes (the package is deterministic, tests/test_determinism.py).
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

from quantfab.tasks.gates import Z95

LAYER = re.compile(r"^(?P<prefix>.*?layers)\.(?P<layer>\d+)\.(?P<kind>.+)$")
EXPERT = re.compile(r"\.experts\.\d+\.")


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100, metadata={"Software": None})
    return out.getvalue()


def size_kl_chart(report: dict[str, Any]) -> bytes | None:
    """Bits per weight against KL, one point per output with its 95 % interval; None when KL was not measured."""
    fig = size_kl_figure(report)
    return None if fig is None else _png(fig)


def size_kl_figure(report: dict[str, Any]) -> Any:
    """The chart's matplotlib Figure (None without KL): one error bar per output."""
    from matplotlib.figure import Figure

    points = [(key, m["bits_per_weight"], m["kl_divergence"], Z95 * m.get("kl_divergence_se", 0.0))
              for key, m in report.get("outputs", {}).items() if "kl_divergence" in m and "bits_per_weight" in m]
    if not points:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for key, x, y, err in points:
        ax.errorbar([x], [y], yerr=[[min(err, y * 0.999) if y > 0 else 0], [err]], fmt="o", capsize=4, label=key)
        ax.annotate(key, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
    kls = [y for _, _, y, _ in points if y > 0]
    if kls and max(kls) / min(kls) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (file bytes × 8 / parameters)")
    ax.set_ylabel("KL against fp32 (nats/token)")
    ax.set_title(f"Size against KL, 95 % intervals ({report.get('protocol', {}).get('tokens', '?')} tokens)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def module_error_grid(modules: list[dict[str, Any]]) -> tuple[list[int], list[str], np.ndarray] | None:
    """Layers, module kinds and their relative output errors (NaN where none; a layer's experts averaged per
    matrix), from a report's module list; None where no module has an error."""
    cells: dict[tuple[int, str], list[float]] = {}
    for r in modules:
        found = LAYER.match(r["name"])
        if found is None or r.get("relative_output_error") is None:
            continue
        cells.setdefault((int(found["layer"]), EXPERT.sub(".experts.*.", found["kind"])), []).append(
            r["relative_output_error"])
    if not cells:
        return None
    layers = sorted({layer for layer, _ in cells})
    kinds = sorted({kind for _, kind in cells})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), values in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = float(np.mean(values))
    return layers, kinds, grid


def module_error_heatmap(key: str, modules: list[dict[str, Any]]) -> bytes | None:
    """One output's relative output error per layer and module kind, on a log colour scale."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    found = module_error_grid(modules)
    if found is None:
        return None
    layers, kinds, grid = found
    positive = grid[np.isfinite(grid) & (grid > 0)]
    fig = Figure(figsize=(max(5.0, 0.8 * len(kinds) + 2), max(3.0, 0.25 * len(layers) + 1.5)))
    ax = fig.add_subplot()
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size and positive.max() > positive.min() else None
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", norm=norm)
    ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(f"{key}: relative output error per module", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _png(fig)


def charts(report: dict[str, Any]) -> dict[str, bytes]:
    """Every chart of a build, by its path in the package."""
    out = {}
    chart = size_kl_chart(report)
    if chart is not None:
        out["charts/size-vs-kl.png"] = chart
    for key, m in report.get("outputs", {}).items():
        heat = module_error_heatmap(key, m.get("modules", []))
        if heat is not None:
            out[f"charts/{key}-module-error.png"] = heat
    return out
