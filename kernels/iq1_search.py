"""The IQ1_S / IQ1_M lattice searches (iq1_search.cu) on the current backend.

Their NumPy specification is llama.cpp's quantize_iq1_s / quantize_iq1_m as ported in tasks/quantize/iq1_grids.py
(``search_reference``): the numpy backend runs it, the others launch one thread per 256-weight super-block and
answer the same ggml bytes.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from quantfab.kernels.backends import Backend, current
from quantfab.tasks.quantize.iq1_grids import IQ1_GRIDS, SUPER, _table

SOURCE = "iq1_search.cu"
KERNELS = {"IQ1_S": "iq1_s_search", "IQ1_M": "iq1_m_search"}


def search_blocks(grid_name: str, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """quantize_<type> on rows ``x`` (rows, cols), cols a multiple of 256, with an importance per column (or None,
    which IQ1_S refuses) -> ggml bytes (rows, cols // 256 * type_size) uint8."""
    grid = next(g for g in IQ1_GRIDS if g.name == grid_name)
    be = current()
    if be.name == "numpy":
        return grid.search_reference(x, importance)[2]
    x, importance = grid.checked(x, importance)
    xb = grid._blocks(x)
    rows, cols = x.shape
    supers = rows * cols // SUPER
    weighted = importance is not None
    out = be.xp.empty((supers, grid.type_size), np.uint8)
    be.launch(SOURCE, KERNELS[grid_name], supers, be.to_device(xb),
              be.to_device(np.asarray(importance if weighted else np.zeros(1), np.float32)), int(weighted), supers,
              cols // SUPER, *_device_table(be), out)
    return be.to_host(out).reshape(rows, -1)


@lru_cache(maxsize=None)
def _device_table(be: Backend) -> tuple[Any, ...]:
    """The codebook arrays the kernels read, on the backend's device (copied there once): points, index, slot,
    neighbours, counts and the neighbour lists' width."""
    t = _table()
    return (*(be.to_device(a) for a in (t.points, t.index, t.slot, t.neighbours, t.counts)), t.neighbours.shape[1])
