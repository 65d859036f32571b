"""rtn: round to nearest with the grid's reference scale rule (llama.cpp's own rule on GGUF grids)."""

from __future__ import annotations

import numpy as np

from quantfab.tasks.quantize.grids import Encoded, Grid
from quantfab.tasks.quantize.stats import InputStats


class RoundToNearest:
    name = "rtn"
    uses_calibration = False

    def quantize(self, w: np.ndarray, grid: Grid, stats: InputStats | None) -> Encoded:
        return grid.reference(w)
