"""The K-quant scale searches (kquant_search.cu) on the current backend.

Their NumPy specification is llama.cpp's make_qkx2_quants (make_qkx3_quants with weights is the same search) and
make_qx_quants as ported in
tasks/quantize/kquants.py (``search_min_scale_reference``, ``search_signed_scale_reference``): the numpy backend runs those,
the others launch one thread per sub-block and answer the same arrays bit for bit.
"""

from __future__ import annotations

import numpy as np

from quantfab.kernels.backends import current
from quantfab.tasks.quantize.kquants import search_min_scale_reference, search_signed_scale_reference

SOURCE = "kquant_search.cu"
F = np.float32


def search_min_scale(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants for every row of ``x`` (one sub-block each): (scale, min as a positive offset, codes)."""
    be = current()
    if be.name == "numpy":
        return search_min_scale_reference(x, weights, nmax, rmin, rdelta, nstep, use_mad)
    rows, n = x.shape
    scale, mins = be.xp.empty(rows, F), be.xp.empty(rows, F)
    codes, scratch = be.xp.empty((rows, n), np.uint8), be.xp.empty((rows, n), np.uint8)
    be.launch(SOURCE, "search_min_scale", rows, be.to_device(np.asarray(x, F)), be.to_device(np.asarray(weights, F)),
              rows, n, nmax, rmin, rdelta, nstep, int(use_mad), scale, mins, codes, scratch)
    return be.to_host(scale), be.to_host(mins), be.to_host(codes).astype(np.int32)


def search_signed_scale(x: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, weights) per row: (scale, codes in [0, 2 nmax))."""
    be = current()
    if be.name == "numpy":
        return search_signed_scale_reference(x, weights, nmax)
    rows, n = x.shape
    scale = be.xp.empty(rows, F)
    codes, scratch = be.xp.empty((rows, n), np.uint8), be.xp.empty((rows, n), np.uint8)
    be.launch(SOURCE, "search_signed_scale", rows, be.to_device(np.asarray(x, F)), be.to_device(np.asarray(weights, F)),
              rows, n, nmax, scale, codes, scratch)
    return be.to_host(scale), be.to_host(codes).astype(np.int32)
