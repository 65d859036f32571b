"""llama.cpp's 2-bit lattice searches (IQ2_XXS, IQ2_XS, IQ2_S; iq2_search.cu) on the current backend.

Their NumPy specification is tasks/quantize/iq2_grids.py (``IQ2Grid.search_reference``): the numpy backend runs it,
the others launch one thread per 256-weight super-block and answer the same ggml bytes bit for bit.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from quantfab.kernels.backends import current
from quantfab.tasks.quantize.iq2_grids import IQ2_GRIDS, IQ2Grid

SOURCE = "iq2_search.cu"
GRIDS = {g.name: g for g in IQ2_GRIDS if isinstance(g, IQ2Grid)}
TYPES = {"IQ2_XXS": 0, "IQ2_XS": 1, "IQ2_S": 2}  # the kernel's enum


@lru_cache(maxsize=None)
def codebook_arrays(name: str) -> tuple[np.ndarray, ...]:
    """The grid's LatticeTable as the kernel reads it: points, index, slot, and the neighbour lists flattened
    (list s at neighbours[starts[s]:starts[s + 1]]) rather than padded to the longest (a twentieth of the bytes)."""
    table = GRIDS[name].table
    starts = np.concatenate([[0], np.cumsum(table.counts)]).astype(np.int32)
    neighbours = table.neighbours[table.neighbours >= 0].astype(np.uint16)  # row by row: each list in its order
    return (np.ascontiguousarray(table.points), table.index, table.slot, starts, neighbours)


def search_blocks(grid_name: str, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """quantize_<type>(x, rows, cols, importance) -> ggml bytes uint8 (rows, cols // 256 * type_size). x: float32
    (rows, cols) with cols a multiple of 256; importance: float32 (cols,), or None for IQ2_S."""
    grid = GRIDS[grid_name]
    be = current()
    if be.name == "numpy":
        return grid.search_reference(x, importance)[2]
    x, importance = grid.checked(x, importance)
    rows, cols = x.shape
    supers = rows * cols // 256
    out = be.xp.empty((rows, cols // 256 * grid.type_size), np.uint8)
    qw = np.zeros(1, np.float32) if importance is None else importance
    tables = [be.to_device(a) for a in codebook_arrays(grid_name)]
    be.launch(SOURCE, "iq2_search", supers, be.to_device(x), be.to_device(qw), int(importance is not None),
              TYPES[grid_name], supers, cols // 256, grid.type_size, *tables, out)
    return be.to_host(out)
