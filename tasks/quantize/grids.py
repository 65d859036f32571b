"""Quantization grids: the contract between methods and formats.

A grid says how a row of weights is cut into blocks, which integer codes a block may hold, how its
scale (and min) are stored, and how codes decode back to floats. A method picks codes on a grid; a
format stores those codes unchanged. Each grid is one small class with a NumPy reference, in the
manner of gguf-py's ``quants.py``; ``GRIDS`` is the registry keyed by name.

Codes are int8 arrays shaped like the weight; scales ``d`` and mins ``m`` are float32 arrays of shape
(rows, blocks) that hold values exactly representable in the grid's scale dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch


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

    def blocks(self, w: np.ndarray) -> np.ndarray:
        """View (rows, cols) as (rows, cols // block, block); cols must divide by the block."""
        rows, cols = w.shape
        return w.reshape(rows, cols // self.block, self.block)

    def reference(self, w: np.ndarray) -> Encoded:
        """Round-to-nearest codes with the reference scale rule of this grid's home ecosystem."""
        d, m = self.scale_candidates(w, 1.0)
        return self.finalize(Encoded(self.encode(w, d, m), d, m))

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored scale (and min/zero) of every block when its range is shrunk by ``ratio``."""
        raise NotImplementedError

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

    def for_row(self, cols: int) -> "Grid":
        """The grid a tensor with rows of ``cols`` elements gets (a per-channel grid becomes one block per row)."""
        return self


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, 0, 1 / d).astype(np.float32)


class SymmetricGrid(Grid):
    """value = d * q with signed codes q in [qmin, qmax]; q = roundf(x / d)."""

    symmetric = True

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return np.clip(_round_half_away(x * _inverse(d)), self.qmin, self.qmax).astype(np.int8)

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return (d * q.astype(np.float32)).astype(np.float32)


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
        q = np.floor((x - m) * _inverse(d) + np.float32(0.5))
        return np.clip(q, 0, self.qmax).astype(np.int8)

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        assert m is not None
        return ((d * q.astype(np.float32)) + m).astype(np.float32)


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

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        # llama.cpp: q = min(15, (int8)(x * id + 8.5)) - 8; floor equals the C cast once clipped to >= 0.
        q = np.floor(x * _inverse(d) + np.float32(8.5))
        return (np.clip(q, 0, 15) - 8).astype(np.int8)

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


class IntGrid(Grid):
    """INT{bits}_G{group}_{SYM|ASYM}: the integer grid of compressed-tensors, GPTQ and AWQ checkpoints.

    Codes are signed, q in [-2**(bits-1), 2**(bits-1) - 1], rounded half to even as torch.round does.
    Symmetric: d = absmax / ((2**bits - 1) / 2), value = d * q. Asymmetric: the range is widened to hold 0,
    d = (max - min) / (2**bits - 1), an integer zero point z = round(qmin - min / d) in the code range, and
    value = d * (q - z). Scales are stored as fp16.
    """

    def __init__(self, bits: int, block: int, symmetric: bool):
        self.bits, self.block, self.symmetric = bits, block, symmetric
        self.qmin, self.qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        self.name = f"INT{bits}_G{block}_{'SYM' if symmetric else 'ASYM'}"

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        b = self.blocks(w)
        hi, lo = b.max(axis=-1) * np.float32(ratio), b.min(axis=-1) * np.float32(ratio)
        levels = np.float32(self.qmax - self.qmin)
        if self.symmetric:
            return self.store_scale(np.maximum(np.abs(hi), np.abs(lo)) / (levels / 2)), None
        hi, lo = np.maximum(hi, 0), np.minimum(lo, 0)
        d = self.store_scale((hi - lo) / levels)
        z = np.clip(np.rint(self.qmin - lo * _inverse(d)), self.qmin, self.qmax).astype(np.float32)
        return d, z

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        q = np.rint(x * _inverse(d)) + (0 if m is None else m)
        return np.clip(q, self.qmin, self.qmax).astype(np.int8)

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        z = np.float32(0) if m is None else m
        return (d * (q.astype(np.float32) - z)).astype(np.float32)


class IntChannelGrid(IntGrid):
    """INT{bits}_CH_{SYM|ASYM}: one scale per output row (compressed-tensors' channel strategy).

    Its block is the row, so it stands for no tensor until ``for_row`` makes it INT{bits}_G{cols}.
    """

    def __init__(self, bits: int, symmetric: bool):
        super().__init__(bits, 0, symmetric)
        self.name = f"INT{bits}_CH_{'SYM' if symmetric else 'ASYM'}"

    def for_row(self, cols: int) -> Grid:
        return grid_named(f"INT{self.bits}_G{cols}_{'SYM' if self.symmetric else 'ASYM'}")


class NF4Grid(Grid):
    """NF4_B{block}[_DQ]: bitsandbytes' NormalFloat-4, the nearest of 16 fixed values times the block absmax.

    Codes are the codebook index 0..15, chosen as bitsandbytes' CPU path chooses them (x * (1 / absmax),
    clamped to [-1, 1], bucketized on the float32 midpoints; a tie goes to the lower index). With _DQ the
    absmax values are themselves quantized afterwards as bitsandbytes' ``compress_statistics`` does:
    minus their mean, 8-bit blockwise on the signed dynamic map in blocks of 256. Codes keep using the
    exact absmax, as bitsandbytes' do; ``d`` becomes the absmax the reader reconstructs.
    """

    bits, qmin, qmax, symmetric = 4, 0, 15, True
    scale_dtype = np.float32
    CODEBOOK = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
    NESTED_BLOCK = 256

    def __init__(self, block: int, double_quant: bool):
        self.block, self.double_quant = block, double_quant
        self.name = f"NF4_B{block}" + ("_DQ" if double_quant else "")
        self.bounds = ((self.CODEBOOK[:-1] + self.CODEBOOK[1:]) / np.float32(2)).astype(np.float32)

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        return (np.abs(self.blocks(w)).max(axis=-1) * np.float32(ratio)).astype(np.float32), None

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        inv = (np.float32(1) / np.maximum(d, np.float32(1e-38))).astype(np.float32)
        scaled = np.clip(x * inv, -1, 1).astype(np.float32)
        return np.searchsorted(self.bounds, scaled, side="left").astype(np.int8)

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return (self.CODEBOOK[q.astype(np.int64)] * d).astype(np.float32)

    def finalize(self, enc: Encoded) -> Encoded:
        if not self.double_quant:
            return enc
        absmax = enc.d.reshape(-1)
        offset = absmax.mean(dtype=np.float32)
        codes, nested_absmax = blockwise_8bit(absmax - offset, self.NESTED_BLOCK)
        decoded = (blockwise_8bit_decode(codes, nested_absmax, self.NESTED_BLOCK) + offset).astype(np.float32)
        return Encoded(enc.codes, decoded.reshape(enc.d.shape), None,
                       {"nested_codes": codes, "nested_absmax": nested_absmax, "offset": np.array([offset], np.float32)})


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), the same float32 values."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return np.array(sorted(data), dtype=np.float32)


def blockwise_8bit(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest dynamic-map index of x / absmax per block of ``block`` (the last block may be short)."""
    code = DYNAMIC_MAP
    n = x.size
    pad = (-n) % block
    xb = np.concatenate([x, np.zeros(pad, np.float32)]).reshape(-1, block)
    absmax = np.abs(xb).max(axis=-1).astype(np.float32)
    normed = (xb / np.maximum(absmax, np.float32(1e-38))[:, None]).astype(np.float32)
    idx = np.clip(np.searchsorted(code, normed, side="left"), 1, len(code) - 1)
    lower, upper = code[idx - 1], code[idx]
    pick = np.where(np.abs(normed - lower) <= np.abs(upper - normed), idx - 1, idx)
    return pick.reshape(-1)[:n].astype(np.uint8), absmax


def blockwise_8bit_decode(codes: np.ndarray, absmax: np.ndarray, block: int) -> np.ndarray:
    n = codes.size
    values = DYNAMIC_MAP[codes.astype(np.int64)]
    pad = (-n) % block
    vb = np.concatenate([values, np.zeros(pad, np.float32)]).reshape(-1, block)
    return (vb * absmax[:, None]).astype(np.float32).reshape(-1)[:n]


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves round away from zero (NumPy's rint rounds them to even).

    Computed as floor(a) + (a - floor(a) >= 0.5), which is exact; floor(a + 0.5) is not, because the
    sum itself can round up just below a half.
    """
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + (a - f >= np.float32(0.5)))


GRIDS: dict[str, Grid] = {g.name: g for g in (Q8_0(), Q4_0(), Q4_1())}
DYNAMIC_MAP = dynamic_map()
_PARAMETRIC = re.compile(r"^(?:INT(?P<bits>[2-8])_(?:G(?P<group>\d+)|(?P<ch>CH))_(?P<sym>SYM|ASYM)"
                         r"|NF4_B(?P<nf4>\d+)(?P<dq>_DQ)?)$")


@lru_cache(maxsize=None)
def grid_named(name: str) -> Grid:
    """The grid called ``name``: a fixed GGUF grid, INT{bits}_{G{group}|CH}_{SYM|ASYM}, or NF4_B{block}[_DQ]."""
    if name in GRIDS:
        return GRIDS[name]
    found = _PARAMETRIC.match(name)
    if found is None:
        raise KeyError(f"no grid named {name}")
    if found["nf4"]:
        return NF4Grid(int(found["nf4"]), bool(found["dq"]))
    if found["ch"]:
        return IntChannelGrid(int(found["bits"]), found["sym"] == "SYM")
    return IntGrid(int(found["bits"]), int(found["group"]), found["sym"] == "SYM")
