"""IQ3_XXS's and IQ3_S's lattice searches (iq3_search.cu) on the current backend.

Their NumPy specification is llama.cpp's quantize_iq3_xxs / quantize_iq3_s as ported in tasks/quantize/iq3_grids.py
(``search_reference``): the numpy backend runs it, the others launch one thread per 256-weight super-block and
answer the same ggml bytes bit for bit.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from quantfab.kernels.backends import Backend, current
from quantfab.tasks.quantize.iq3_grids import IQ3_GRIDS, QK

SOURCE = "iq3_search.cu"
KERNELS = {"IQ3_XXS": "iq3_xxs_search", "IQ3_S": "iq3_s_search"}
F = np.float32


@lru_cache(maxsize=None)
def _tables(backend: Backend, grid_name: str) -> tuple[Any, ...]:
    """The codebook's LatticeTable arrays the kernel reads, on the backend's device once per process: points,
    index, slot, neighbours, counts, then the neighbour lists' width."""
    table = next(g for g in IQ3_GRIDS if g.name == grid_name).table
    arrays = (table.points, table.index, table.slot, table.neighbours, table.counts)
    return (*(backend.to_device(np.ascontiguousarray(a)) for a in arrays), table.neighbours.shape[1])


def search_blocks(grid_name: str, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """quantize_<type>(x, rows, cols, importance or NULL) for ``grid_name`` (IQ3_XXS or IQ3_S): the ggml bytes
    (rows, cols // 256 * type_size) uint8."""
    grid = next(g for g in IQ3_GRIDS if g.name == grid_name)
    be = current()
    if be.name == "numpy":
        return grid.search_reference(x, importance)[2]
    x, importance = grid.checked(x, importance)
    rows, cols = x.shape
    weighted = importance is not None
    imp = importance if weighted else np.zeros(1, F)
    supers = rows * (cols // QK)
    out = be.xp.empty((rows, cols // QK * grid.type_size), np.uint8)  # the kernel writes every byte
    be.launch(SOURCE, KERNELS[grid_name], supers, be.to_device(x), be.to_device(imp), int(weighted), supers, cols,
              *_tables(be, grid_name), out)
    return be.to_host(out)
