"""rtn: round to nearest with the grid's reference scale rule (llama.cpp's own rule on GGUF grids; with an importance
matrix, llama-quantize --imatrix's: the calibration's mean squared input per column weighs each rounding error)."""

from __future__ import annotations

import numpy as np

from quantfab.tasks.quantize.grid_base import reference_by_rows
from quantfab.tasks.quantize.grids import Encoded, Grid
from quantfab.tasks.quantize.layer import PerModule
from quantfab.tasks.quantize.stats import InputStats


class RoundToNearest(PerModule):
    name = "rtn"
    reads_inputs = False

    def quantize(self, w: np.ndarray, grid: Grid, stats: InputStats | None) -> Encoded:
        if not self.importance:
            return reference_by_rows(grid, w)
        if stats is None:
            raise RuntimeError("rtn with an importance matrix got no statistics: reads_statistics decided otherwise")
        return reference_by_rows(grid, w, stats.importance())


class NormalFloat4(RoundToNearest):
    """nf4: the nearest NF4 codebook value times the block absmax, as bitsandbytes' quantize_4bit does.

    The method is round-to-nearest; what makes it NF4 is the grid it asks formats for (see ``assign``).
    """

    name = "nf4"
