"""The grid contract: what a method hands a format, and the two decoding rules every grid builds on.

A grid says how a row of weights is cut into blocks, which integer codes a block may hold, how its
scale (and min) are stored, and how codes decode back to floats. A method picks codes on a grid; a
format stores those codes unchanged.

Codes are int8 arrays shaped like the weight; scales ``d`` and mins ``m`` are float32 arrays of shape
(rows, blocks) that hold values exactly representable in the grid's scale dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class Encoded:
    """Integer codes on a grid plus the per-block scale, and the min or zero point where the grid has one.

    ``extra`` holds grid-specific stored state a format needs beyond d and m (NF4's nested absmax codes).
    """

    codes: np.ndarray  # int8, (rows, cols)
    d: np.ndarray  # float32, (rows, cols // block)
    m: np.ndarray | None  # float32, (rows, cols // block): a float min (Q4_1) or an integer zero point (INT*_ASYM)
    extra: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class GridRequest:
    """What a recipe asks of a format's grid; None fields mean "the output type's own"."""

    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    nf4: bool = False  # the NormalFloat-4 codebook instead of evenly spaced integers
    double_quant: bool = False  # NF4 only: quantize the absmax values too


REFERENCE_ELEMENTS = 1 << 22  # weights ``reference_by_rows`` encodes at once (a search's temporaries are ~10x)


def reference_by_rows(grid: "Grid", w: np.ndarray, importance: np.ndarray | None = None,
                      elements: int = REFERENCE_ELEMENTS) -> Encoded:
    """``grid.reference(w, importance)`` a slice of rows at a time, so a search's temporaries scale with the slice,
    not with an embedding of 128k rows or a 70B MLP. Scales are per block within a row, so the codes are the same
    (and the stored fields in ``extra``, rows first); a grid whose ``finalize`` spans rows (NF4's nested absmax) is
    encoded whole; slices of a grid whose scales span rows hold whole row blocks."""
    rows = max(grid.row_span, elements // w.shape[1] // grid.row_span * grid.row_span)
    if rows >= w.shape[0] or type(grid).finalize is not Grid.finalize:
        return grid.reference(w, importance)
    parts = [grid.reference(w[s:s + rows], importance) for s in range(0, w.shape[0], rows)]
    m = None if parts[0].m is None else np.concatenate([p.m for p in parts])
    extra = {k: np.concatenate([p.extra[k] for p in parts]) for k in parts[0].extra}
    return Encoded(np.concatenate([p.codes for p in parts]), np.concatenate([p.d for p in parts]), m, extra)


class Grid:
    """Base class: a grid of ``bits``-bit codes in blocks of ``block`` along the input dimension.

    Subclasses define the elementwise rules ``encode_values``/``decode_values`` (broadcasting codes
    against per-element scales) and the scale rule ``scale_candidates``; whole-tensor ``encode``/``decode``
    and the column-at-a-time use GPTQ makes of a grid both go through those rules.
    """

    name: str
    bits: int
    block: int
    symmetric: bool
    qmin: int
    qmax: int
    scale_dtype = np.float16
    row_span = 1  # rows that share each scale (FP8's 128x128 blocks): d repeats it on each of them
    fused_scale = False  # a scale shared by the Linears reading one input (NVFP4's global): ``bind`` needs them

    def blocks(self, w: np.ndarray) -> np.ndarray:
        """View (rows, cols) as (rows, cols // block, block); cols must divide by the block."""
        rows, cols = w.shape
        return w.reshape(rows, cols // self.block, self.block)

    def reference(self, w: np.ndarray, importance: np.ndarray | None = None) -> Encoded:
        """Round-to-nearest codes with the reference scale rule of this grid's home ecosystem. ``importance``: per
        input column, the mean squared input on the calibration set (llama.cpp's importance matrix); a grid whose
        home ecosystem weighs its rounding error by one (GGUF's but Q8_0) chooses its codes with it, the others
        ignore it."""
        d, m = self.scale_candidates(w, 1.0)
        return self.finalize(Encoded(self.encode(w, d, m), d, m))

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored scale (and min/zero) of every block when its range is shrunk by ``ratio``."""
        raise NotImplementedError

    def scales_for_ratios(self, w: np.ndarray, ratios: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """``scale_candidates`` for each ratio in turn (a grid may share work between them)."""
        for ratio in ratios:
            yield self.scale_candidates(w, float(ratio))

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        """Codes for values ``x`` given broadcastable stored scales and mins."""
        raise NotImplementedError

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        """Float32 values of codes ``q``, computed exactly as the format's own reader computes them."""
        raise NotImplementedError

    def encode(self, w: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        """Codes for ``w`` given stored (already dtype-rounded) scales and mins, one per block."""
        mm = None if m is None else m[..., None]
        return self.encode_values(self.blocks(w), d[..., None], mm).astype(np.int8).reshape(w.shape)

    def round_trip(self, w: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        """decode(encode(w)) with these scales: what a search scores (a grid may skip the int8 codes)."""
        return self.decode(Encoded(self.encode(w, d, m), d, m))

    def decode(self, enc: Encoded) -> np.ndarray:
        """Float32 reconstruction of a whole tensor."""
        mm = None if enc.m is None else enc.m[..., None]
        return self.decode_values(self.blocks(enc.codes), enc.d[..., None], mm).reshape(enc.codes.shape)

    def finalize(self, enc: Encoded) -> Encoded:
        """Post-process once every block's codes are chosen (NF4's double quantization of absmax)."""
        return enc

    def store_scale(self, x: np.ndarray) -> np.ndarray:
        """Round a float32 scale to the stored dtype and back, so codes see what the file holds."""
        return x.astype(self.scale_dtype).astype(np.float32)

    def bind(self, weights: Sequence[np.ndarray]) -> "Grid":
        """The grid for these weights (one tensor, or the Linears the engine fuses with it): NVFP4's global scale
        spans them; every other grid is the same for any tensor."""
        return self

    def for_row(self, cols: int) -> "Grid":
        """The grid a tensor with rows of ``cols`` elements gets (a per-channel grid becomes one block per row)."""
        return self

    @property
    def span(self) -> int:
        """Columns whose scales are chosen together: the block, or a K-quant's super-block of sub-blocks."""
        return self.block

    def span_total(self, err: np.ndarray) -> np.ndarray:
        """Per-block errors (rows, blocks) summed over each span and repeated per block.

        A search that keeps the better of two candidates must choose per span: a K-quant's sub-block
        scales are integers relative to one scale of their super-block, so they cannot be mixed.
        """
        k = self.span // self.block
        if k == 1:
            return err
        rows, blocks = err.shape
        return np.repeat(err.reshape(rows, blocks // k, k).sum(axis=-1), k, axis=-1)


def inverse_or_zero(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, 0, 1 / d).astype(np.float32)


class SymmetricGrid(Grid):
    """value = d * q with signed codes q in [qmin, qmax]; q = roundf(x / d)."""

    symmetric = True

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return np.clip(round_half_away(x * inverse_or_zero(d)), self.qmin, self.qmax).astype(np.int8)

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return np.multiply(d, q, dtype=np.float32)


class AsymmetricGrid(Grid):
    """value = d * q + m with unsigned codes q in [0, 2**bits - 1] and a float min per block."""

    symmetric = False
    qmin = 0

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        b = self.blocks(w)
        hi, lo = b.max(axis=-1) * ratio, b.min(axis=-1) * ratio
        return self.store_scale((hi - lo) / self.qmax), self.store_scale(lo)

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        assert m is not None
        q = np.floor((x - m) * inverse_or_zero(d) + np.float32(0.5))
        return np.clip(q, 0, self.qmax).astype(np.int8)

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        assert m is not None
        return np.multiply(d, q, dtype=np.float32) + m


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves round away from zero (NumPy's rint rounds them to even).

    Computed as floor(a) + (a - floor(a) >= 0.5), which is exact; floor(a + 0.5) is not, because the
    sum itself can round up just below a half.
    """
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + (a - f >= np.float32(0.5)))
