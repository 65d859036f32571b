"""What llama.cpp's lattice types (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M) share: a codebook of
points in 8 (or 4) dimensions whose coordinates take a few levels, the nearest points of every key off the codebook,
and a grid whose codes are each weight's signed codebook value.

A group of 8 (or 4) weights is stored as one codebook index plus signs, so a code is chosen for the group, never for
one weight: such a grid offers only ``reference`` (llama.cpp's search, ported per type), and a method that codes a
column at a time cannot use it. ``Encoded.codes`` holds each weight's signed codebook value and ``d`` each block's
effective scale, products exact in float32, so ``d * codes`` is what gguf-py's dequantize computes; the ggml bytes
the search wrote are ``extra["blocks"]`` (rows, bytes of a row), which the GGUF packer stores as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from quantfab.tasks.quantize.grid_base import Encoded, Grid

F = np.float32
BEYOND = np.iinfo(np.int32).max
CANDIDATES = 1 << 18  # (group, neighbour) pairs scored at once


@dataclass(frozen=True)
class LatticeTable:
    """One codebook as llama.cpp's iq2xs_init_impl / iq3xs_init_impl build it.

    A key packs a group's levels, ``level_bits`` per coordinate, first coordinate lowest. ``points`` holds each
    codebook entry's coordinates as 2 * level + 1; ``index`` maps a key to its entry, or -1 off the codebook;
    ``neighbours[slot[key]]`` lists, for a key off the codebook whose levels the codebook uses, the entries at its
    ``nwant`` smallest distinct squared distances, nearest first and by entry on a tie (llama.cpp's qsort order),
    padded with -1.
    """

    points: np.ndarray  # (entries, dims) int8
    values: np.ndarray  # (entries, dims) int8: the coordinates as stored and decoded (gguf-py's grid)
    index: np.ndarray  # (keys,) int32
    slot: np.ndarray  # (keys,) int32
    neighbours: np.ndarray  # (keys off the codebook, width) int16
    counts: np.ndarray  # (keys off the codebook,) int32: each list's length
    coords: np.ndarray  # (dims, keys off the codebook, width) float32: the neighbours' points, gathered once
    level_bits: int

    def key(self, levels: np.ndarray) -> np.ndarray:
        """Keys of groups of levels (..., dims) -> (...,) int64."""
        shifts = self.level_bits * np.arange(levels.shape[-1], dtype=np.int64)
        return (levels.astype(np.int64) << shifts).sum(axis=-1)

    def nearest(self, keys: np.ndarray, x: np.ndarray, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """iq*_find_best_neighbour for keys off the codebook: the neighbour minimizing sum weight * (scale * point -
        x)^2, summed in coordinate order in float32, the first on a tie. keys (n,), x and weight (n, dims), scale
        (n,) -> entries (n,). Keys are taken in buckets of similar list lengths (powers of two), so a group scores
        about as many candidates as its key has, not the longest list's."""
        rows = self.slot[keys]
        bucket = np.ceil(np.log2(np.maximum(self.counts[rows], 1))).astype(np.int8)
        out = np.empty(len(keys), np.int32)
        for b in np.unique(bucket):
            members = np.nonzero(bucket == b)[0]
            width = min(1 << int(b), self.neighbours.shape[1])
            step = max(1, CANDIDATES // width)
            for s in range(0, len(members), step):
                part = members[s:s + step]
                cand = self.neighbours[rows[part], :width]
                d2 = np.zeros(cand.shape, F)
                for i, coord in enumerate(self.coords):
                    diff = scale[part, None] * coord[rows[part], :width] - x[part, None, i]
                    d2 = d2 + weight[part, None, i] * diff * diff
                d2 = np.where(cand < 0, np.inf, d2)
                out[part] = cand[np.arange(len(cand)), np.argmin(d2, axis=1)]
        return out


@lru_cache(maxsize=None)
def lattice_table(codebook: type, level_bits: int, nwant: int) -> LatticeTable:
    """The table for a gguf-py quant class's codebook (IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ3_XXS, IQ3_S): its grid
    values, mapped back to their levels, are llama.cpp's kgrid tables."""
    codebook.init_grid()
    values = np.asarray(codebook.grid, np.float32).reshape(codebook.grid_shape)
    levels = np.searchsorted(np.asarray(codebook.grid_map, np.float32), values)
    dims = values.shape[1]
    points = (2 * levels + 1).astype(np.int8)
    shifts = level_bits * np.arange(dims, dtype=np.int64)
    keys = 1 << (level_bits * dims)
    index = np.full(keys, -1, np.int32)
    index[(levels.astype(np.int64) << shifts).sum(axis=1)] = np.arange(len(points), dtype=np.int32)
    all_levels = (np.arange(keys, dtype=np.int64)[:, None] >> shifts) & ((1 << level_bits) - 1)
    pos = (2 * all_levels + 1).astype(np.int32)
    reachable = (all_levels < len(codebook.grid_map)).all(axis=1)  # a search clamps each level to the codebook's
    off = np.nonzero((index < 0) & reachable)[0]
    lists: list[np.ndarray] = []
    entries = len(points)
    pt = points.astype(np.int32)
    for start in range(0, len(off), 2048):
        p = pos[off[start:start + 2048]]
        d2 = (p * p).sum(1)[:, None] + (pt * pt).sum(1)[None, :] - 2 * p @ pt.T
        limit = d2.min(axis=1, keepdims=True)
        for _ in range(nwant - 1):  # the next distinct distance, where there is one
            following = np.where(d2 > limit, d2, BEYOND).min(axis=1, keepdims=True)
            limit = np.where(following == BEYOND, limit, following)
        order = np.where(d2 <= limit, d2 * entries + np.arange(entries), np.iinfo(np.int64).max)
        lists.append(np.sort(order, axis=1))
    width = max(int((part < np.iinfo(np.int64).max).sum(axis=1).max()) for part in lists) if lists else 1
    neighbours = np.concatenate([np.where(p[:, :width] < np.iinfo(np.int64).max, p[:, :width] % entries, -1)
                                 for p in lists]).astype(np.int16)
    slot = np.full(keys, -1, np.int32)
    slot[off] = np.arange(len(off), dtype=np.int32)
    counts = (neighbours >= 0).sum(axis=1).astype(np.int32)
    coords = np.ascontiguousarray(points[np.maximum(neighbours, 0)].astype(F).transpose(2, 0, 1))
    return LatticeTable(points, values.astype(np.int8), index, slot, neighbours, counts, coords, level_bits)


def with_parity_sign(seven: np.ndarray) -> np.ndarray:
    """7 stored sign bits -> all 8, the eighth set where the seven are odd (a group's count of negatives is even:
    IQ2_XXS, IQ2_XS, IQ3_XXS; llama.cpp's ksigns_iq2xs)."""
    odd = np.unpackbits(seven[..., None], axis=-1).sum(axis=-1, dtype=np.uint8) & 1
    return (seven | (odd << 7)).astype(np.uint8)


def stored_d(blocks: np.ndarray) -> np.ndarray:
    """The fp16 d that leads each super-block (s, type_size) -> float32 (s,)."""
    return np.ascontiguousarray(blocks[:, :2]).view("<f2")[:, 0].astype(F)


class LatticeGrid(Grid):
    """A lattice type: codes are signed codebook values, ``d`` the effective scale of each ``block`` (the span
    of one stored sub-block scale), and the ggml bytes come from the search itself (``extra["blocks"]``)."""

    symmetric = True
    scale_dtype = np.float32  # effective scales: fp16 x small-integer products, exact in float32
    type_size: int  # bytes of one 256-weight super-block
    needs_importance: bool  # llama.cpp's tensor_requires_imatrix for this type (but token_embd and output)
    asserts_importance = False  # its quantize_<type> asserts quant_weights (IQ1_S, IQ2_XXS, IQ2_XS)
    kernel: Any  # the family's kernels module: search_blocks(name, x, importance) -> ggml bytes on the backend

    def search(self, x: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """llama.cpp's quantize_<type> on the current kernel backend (the NumPy ``search_reference`` on the numpy
        backend): (codes, d, ggml bytes), codes and scales read back from the bytes."""
        x, importance = self.checked(x, importance)
        return self.decoded(self.kernel.search_blocks(self.name, x, importance), x.shape)

    def decoded(self, blocks: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ggml bytes (rows, bytes of a row) -> (codes (rows, cols), d (rows, cols // block), the bytes)."""
        codes, d = self.codes_of(blocks.reshape(-1, self.type_size))
        return codes.reshape(shape), d.reshape(shape[0], -1), blocks

    def codes_of(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ggml bytes (super-blocks, type_size) -> (each weight's signed codebook value int8, each block's
        effective scale float32), in file order."""
        raise NotImplementedError

    @property
    def span(self) -> int:
        return 256

    def checked(self, x: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """x and the importance as contiguous float32, refused where llama.cpp would abort (rows not whole
        super-blocks, no importance where it asserts one) or would read past the importance (not one per column)."""
        if x.ndim != 2 or x.shape[1] % self.span:
            raise ValueError(f"{self.name} codes rows of a multiple of {self.span} weights, not shape {x.shape}")
        if importance is None:
            if self.asserts_importance:
                raise ValueError(f"{self.name} needs an importance matrix (llama.cpp asserts quant_weights)")
            return np.ascontiguousarray(x, F), None
        if np.size(importance) != x.shape[1]:
            raise ValueError(f"{self.name} needs an importance per column ({x.shape[1]}), not {np.size(importance)} "
                             "values")
        return np.ascontiguousarray(x, F), np.ascontiguousarray(importance, F).reshape(-1)

    def reference(self, w: np.ndarray, importance: np.ndarray | None = None) -> Encoded:
        codes, d, blocks = self.search(np.ascontiguousarray(w, F), importance)
        return Encoded(codes, d, None, {"blocks": blocks})

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return np.multiply(d, q, dtype=np.float32)

    def stored_fields(self, enc: Encoded) -> dict[str, np.ndarray]:
        return enc.extra

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        raise TypeError(f"{self.name} codes groups of weights jointly: only its own search (rtn) chooses them")

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        raise TypeError(f"{self.name} codes groups of weights jointly: only its own search (rtn) chooses them")
