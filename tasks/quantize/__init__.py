"""Quantization methods. Adding one is one module here plus one line in ``METHODS``."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from quantfab.tasks.quantize.grids import Encoded, Grid
from quantfab.tasks.quantize.group import GroupClipSearch
from quantfab.tasks.quantize.rtn import RoundToNearest
from quantfab.tasks.quantize.stats import InputStats


class Method(Protocol):
    name: str
    uses_calibration: bool

    def quantize(self, w: np.ndarray, grid: Grid, stats: InputStats | None) -> Encoded: ...


METHODS: dict[str, Method] = {
    "rtn": RoundToNearest(),
    "group": GroupClipSearch(),
}

# Accepted by the recipe schema so recipes can be written and planned now; `run` refuses them until built.
PLANNED_METHODS: dict[str, str] = {
    "nf4": "NormalFloat-4 (bitsandbytes codebook) is planned",
    "gptq": "GPTQ (Hessian-based, layer-sequential) is planned",
    "awq": "AWQ (activation-aware scaling) is planned",
}
