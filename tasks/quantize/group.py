"""group: group-wise quantization with a per-group clipping search weighted by activation energy.

For every block (every super-block of a K-quant) the scale is shrunk by 20 ratios from 1.0 down to 0.5;
the ratio kept is the one with the least output-weighted squared error sum_j E[x_j^2] (w_j - w'_j)^2,
where E[x_j^2] is the diagonal of the calibration Hessian. Without statistics every input channel weighs the same.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from quantfab.tasks.quantize.grids import Encoded, Grid
from quantfab.tasks.quantize.layer import PerModule
from quantfab.tasks.quantize.stats import InputStats
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

RATIOS = np.linspace(1.0, 0.5, 20, dtype=np.float32)


class GroupClipSearch(PerModule):
    name = "group"

    def quantize(self, w: np.ndarray, grid: Grid, stats: InputStats | None) -> Encoded:
        importance = np.ones(w.shape[1], np.float32) if stats is None else stats.channel_energy()
        return clip_search(w, grid, RATIOS, weighted_squares(grid, importance))


# (rows, blocks, block) differences, which it may overwrite -> (rows, blocks) errors
BlockError = Callable[[np.ndarray], np.ndarray]


def weighted_squares(grid: Grid, importance: np.ndarray) -> BlockError:
    """sum_j importance_j * delta_j^2 over each block."""
    weight = torch.from_numpy(np.ascontiguousarray(grid.blocks(importance[None, :].astype(np.float32))[0]))

    def error(delta: np.ndarray) -> np.ndarray:
        d = torch.from_numpy(delta).square_()
        return torch.einsum("rbk,bk->rb", d, weight).numpy()  # a batched matmul; NumPy's einsum is 4x slower
    return error


def clip_search(w: np.ndarray, grid: Grid, ratios: np.ndarray, block_error: BlockError) -> Encoded:
    """Per block (per span), the codes of the range shrink ratio whose reconstruction error is least."""
    best_d = best_m = None
    best_err = np.full((w.shape[0], w.shape[1] // grid.block), np.inf, np.float32)
    for d, m in grid.scales_for_ratios(w, ratios):
        delta = grid.round_trip(w, d, m)
        err = grid.span_total(block_error(grid.blocks(np.subtract(delta, w, out=delta))))
        if best_d is None:
            best_d, best_m, best_err = d, m, err
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d, best_d)
        best_m = None if m is None or best_m is None else np.where(better, m, best_m)
    assert best_d is not None
    return Encoded(grid.encode(w, best_d, best_m), best_d, best_m)  # codes follow from the scales kept
