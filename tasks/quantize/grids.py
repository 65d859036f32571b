"""Quantization grids: the contract between methods and formats.

A grid says how a row of weights is cut into blocks, which integer codes a block may hold, how its
scale (and min) are stored, and how codes decode back to floats. A method picks codes on a grid; a
format stores those codes unchanged. Each grid is one small class with a NumPy reference, in the
manner of gguf-py's ``quants.py``; ``GRIDS`` is the registry keyed by name.

Codes are int8 arrays shaped like the weight; scales ``d`` and mins ``m`` are float32 arrays of shape
(rows, blocks) that hold values exactly representable in the grid's scale dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Encoded:
    """Integer codes on a grid plus the per-block scale (and min, for grids with one)."""

    codes: np.ndarray  # int8, (rows, cols)
    d: np.ndarray  # float32, (rows, cols // block)
    m: np.ndarray | None  # float32, (rows, cols // block) or None


class Grid:
    """Base class: a grid of ``bits``-bit codes in blocks of ``block`` along the input dimension."""

    name: str
    bits: int
    block: int
    symmetric: bool
    qmin: int
    qmax: int
    scale_dtype = np.float16

    def blocks(self, w: np.ndarray) -> np.ndarray:
        """View (rows, cols) as (rows, cols // block, block); cols must divide by the block."""
        rows, cols = w.shape
        return w.reshape(rows, cols // self.block, self.block)

    def reference(self, w: np.ndarray) -> Encoded:
        """Round-to-nearest codes with the reference scale rule of this grid's home ecosystem."""
        raise NotImplementedError

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        """Scale (and min) of every block when its range is shrunk by ``ratio`` (clipping search)."""
        raise NotImplementedError

    def encode(self, w: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        """Codes for ``w`` given stored (already dtype-rounded) scales and mins."""
        raise NotImplementedError

    def decode(self, enc: Encoded) -> np.ndarray:
        """Float32 reconstruction, computed exactly as the format's own reader computes it."""
        raise NotImplementedError

    def store_scale(self, x: np.ndarray) -> np.ndarray:
        """Round a float32 scale to the stored dtype and back, so codes see what the file holds."""
        return x.astype(self.scale_dtype).astype(np.float32)


class SymmetricGrid(Grid):
    """value = d * q with signed codes q in [qmin, qmax]."""

    symmetric = True

    def encode(self, w: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, 0, 1 / d).astype(np.float32)
        q = _round_half_away(self.blocks(w) * inv[..., None])
        return np.clip(q, self.qmin, self.qmax).astype(np.int8).reshape(w.shape)

    def decode(self, enc: Encoded) -> np.ndarray:
        q = self.blocks(enc.codes).astype(np.float32)
        return (enc.d[..., None] * q).reshape(enc.codes.shape)


class AsymmetricGrid(Grid):
    """value = d * q + m with unsigned codes q in [0, 2**bits - 1] and a float min per block."""

    symmetric = False
    qmin = 0

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        b = self.blocks(w)
        hi, lo = b.max(axis=-1) * ratio, b.min(axis=-1) * ratio
        return self.store_scale((hi - lo) / self.qmax), self.store_scale(lo)

    def encode(self, w: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        assert m is not None
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, 0, 1 / d).astype(np.float32)
        q = np.floor((self.blocks(w) - m[..., None]) * inv[..., None] + np.float32(0.5))
        return np.clip(q, 0, self.qmax).astype(np.int8).reshape(w.shape)

    def decode(self, enc: Encoded) -> np.ndarray:
        assert enc.m is not None
        q = self.blocks(enc.codes).astype(np.float32)
        return ((enc.d[..., None] * q) + enc.m[..., None]).reshape(enc.codes.shape)


class Q8_0(SymmetricGrid):
    """llama.cpp Q8_0: blocks of 32, d = amax / 127 (fp16), q = roundf(x / d)."""

    name, bits, block, qmin, qmax = "Q8_0", 8, 32, -127, 127

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        return self.store_scale(np.abs(self.blocks(w)).max(axis=-1) * ratio / 127), None

    def reference(self, w: np.ndarray) -> Encoded:
        d = (np.abs(self.blocks(w)).max(axis=-1) / np.float32(127)).astype(np.float32)
        # llama.cpp encodes with the fp32 scale and stores it as fp16.
        return Encoded(self.encode(w, d, None), self.store_scale(d), None)


class Q4_0(SymmetricGrid):
    """llama.cpp Q4_0: blocks of 32, d = max / -8 (the signed extreme maps to -8), q in [-8, 7]."""

    name, bits, block, qmin, qmax = "Q4_0", 4, 32, -8, 7

    def _signed_max(self, w: np.ndarray) -> np.ndarray:
        b = self.blocks(w)
        idx = np.abs(b).argmax(axis=-1)[..., None]
        return np.take_along_axis(b, idx, axis=-1)[..., 0]

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        return self.store_scale(self._signed_max(w) * np.float32(ratio) / np.float32(-8)), None

    def encode(self, w: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        # llama.cpp: q = min(15, (int8)(x * id + 8.5)) - 8; floor equals the C cast once clipped to >= 0.
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, 0, 1 / d).astype(np.float32)
        q = np.floor(self.blocks(w) * inv[..., None] + np.float32(8.5))
        return (np.clip(q, 0, 15) - 8).astype(np.int8).reshape(w.shape)

    def reference(self, w: np.ndarray) -> Encoded:
        d = (self._signed_max(w) / np.float32(-8)).astype(np.float32)
        return Encoded(self.encode(w, d, None), self.store_scale(d), None)


class Q4_1(AsymmetricGrid):
    """llama.cpp Q4_1: blocks of 32, d = (max - min) / 15 and m = min (both fp16), q in [0, 15]."""

    name, bits, block, qmax = "Q4_1", 4, 32, 15

    def reference(self, w: np.ndarray) -> Encoded:
        b = self.blocks(w)
        lo = b.min(axis=-1)
        d = ((b.max(axis=-1) - lo) / np.float32(15)).astype(np.float32)
        # llama.cpp encodes with fp32 d and min, then stores both as fp16.
        return Encoded(self.encode(w, d, lo), self.store_scale(d), self.store_scale(lo))


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves round away from zero (NumPy's rint rounds them to even).

    Computed as floor(a) + (a - floor(a) >= 0.5), which is exact; floor(a + 0.5) is not, because the
    sum itself can round up just below a half.
    """
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + (a - f >= np.float32(0.5)))


GRIDS: dict[str, Grid] = {g.name: g for g in (Q8_0(), Q4_0(), Q4_1())}
