"""Float grids: codes that are small floating-point numbers rather than evenly spaced integers.

FP8_G{group} / FP8_CH / FP8_B{n}: compressed-tensors' (and vLLM's) float8 weights, E4M3 as ``torch.float8_e4m3fn``
holds them (no infinities, finite max 448, subnormals), times a float32 scale per block of a row, per row, or per
n x n block of the matrix (DeepSeek-V3's 128 x 128).
The code is the float8 bit pattern (viewed as int8), so a format stores it unchanged as a float8 tensor.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from quantfab.tasks.quantize.grid_base import Grid

E4M3_MAX = np.float32(448.0)


@cache
def e4m3_values() -> np.ndarray:
    """float32 values of the 127 non-negative finite E4M3 codes 0x00..0x7E, ascending (code == index)."""
    codes = np.arange(0x7F)
    exponent, mantissa = codes >> 3, (codes & 7).astype(np.float64)
    values = np.where(exponent == 0, mantissa / 8 * 2.0 ** -6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return values.astype(np.float32)


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """E4M3 bit patterns (int8) of float32 ``x``: saturated to ±448, rounded to nearest, ties to even, as
    ``torch.clamp(x, -448, 448).to(torch.float8_e4m3fn)`` rounds them. The sign bit follows x's (so -0.0 too)."""
    table = e4m3_values()
    a = np.minimum(np.abs(x), E4M3_MAX)
    hi = np.minimum(np.searchsorted(table, a, side="left"), len(table) - 1)  # first value >= a
    lo = np.maximum(hi - 1, 0)
    below, above = a - table[lo], table[hi] - a
    pick = np.where((below < above) | ((below == above) & (lo % 2 == 0)), lo, hi)
    pick = np.where(table[hi] == a, hi, pick)  # exact (including 0 and 448)
    return (pick | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8).view(np.int8)


def e4m3_decode(q: np.ndarray) -> np.ndarray:
    """float32 values of E4M3 bit patterns (int8 or uint8)."""
    bits = q.view(np.uint8) if q.dtype == np.int8 else q.astype(np.uint8)
    value = e4m3_values()[np.minimum(bits & 0x7F, 0x7E)]
    return np.where(bits & 0x80, -value, value).astype(np.float32)


class FP8Grid(Grid):
    """FP8_G{group}: E4M3 codes times a float32 scale per ``group`` elements of a row, chosen as
    compressed-tensors' observer and ``quantize`` choose them: d = absmax / 448 (0 becomes float32 eps),
    code = E4M3(clamp(x / d, ±448)), value = float(code) * d."""

    bits, symmetric, qmin, qmax = 8, True, -448, 448
    scale_dtype = np.float32

    def __init__(self, block: int):
        self.block = block
        self.name = f"FP8_G{block}"

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        absmax = np.abs(self.blocks(w)).max(axis=-1) * np.float32(ratio)
        d = (absmax / E4M3_MAX).astype(np.float32)
        return np.where(d == 0, np.finfo(np.float32).eps, d).astype(np.float32), None

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return e4m3_encode(np.divide(x, d, dtype=np.float32))

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return np.multiply(e4m3_decode(q), d, dtype=np.float32)


class FP8ChannelGrid(FP8Grid):
    """FP8_CH: one scale per output row (compressed-tensors' channel strategy, FP8_DYNAMIC's weights); its block
    is the row, so it stands for no tensor until ``for_row`` makes it FP8_G{cols}."""

    def __init__(self) -> None:
        super().__init__(0)
        self.name = "FP8_CH"

    def for_row(self, cols: int) -> Grid:
        from quantfab.tasks.quantize.grids import grid_named

        return grid_named(f"FP8_G{cols}")


class FP8BlockGrid(FP8Grid):
    """FP8_B{n}: one scale per ``n`` rows x ``n`` columns (compressed-tensors' block strategy, FP8_BLOCK's weights).

    ``d`` keeps the Grid shape (rows, cols // n), each block's scale repeated on its n rows, so encoding, decoding
    and GPTQ's column-at-a-time use are FP8_G{n}'s; only choosing a scale (and comparing candidates) spans rows.
    A last block of fewer rows takes the absmax of those it has, as compressed-tensors' zero padding does.
    """

    def __init__(self, block: int):
        super().__init__(block)
        self.row_span = block
        self.name = f"FP8_B{block}"

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        d, _ = super().scale_candidates(w, ratio)  # per row block of one row: then the max over each row block
        return self._spread(np.maximum.reduceat(d, np.arange(0, d.shape[0], self.row_span), axis=0), d.shape[0]), None

    def span_total(self, err: np.ndarray) -> np.ndarray:
        return self._spread(np.add.reduceat(err, np.arange(0, err.shape[0], self.row_span), axis=0), err.shape[0])

    def _spread(self, per_block: np.ndarray, rows: int) -> np.ndarray:
        """(row blocks, col blocks) -> (rows, col blocks), each row block's values on each of its rows."""
        return np.repeat(per_block, self.row_span, axis=0)[:rows]

    def block_scales(self, d: np.ndarray) -> np.ndarray:
        """The stored (ceil(rows / n), cols / n) scales of a (rows, cols / n) ``d``."""
        return np.ascontiguousarray(d[::self.row_span])
