"""Quantization grids, one small class per type with a NumPy reference (in the manner of gguf-py's
``quants.py``); ``GRIDS`` is the registry of the fixed GGUF grids (llama.cpp's IQ4 ones in ``iq_grids``, its lattice
types in ``iq1_grids``, ``iq2_grids``, ``iq3_grids`` on ``lattice``, its MXFP4 in ``fp4_grids``), ``FP4_GRIDS`` of NVFP4 and MXFP4
(``fp4_grids``), ``grid_named`` also builds the parametric ones (INT{bits}_G{group}_{SYM|ASYM}, INT{bits}_CH_..., NF4_B{block}[_DQ],
MLX's affine MLX{bits}_G{group}_{type} in ``mlx_grid``).

The contract they share (``Encoded``, ``Grid``) is in ``grid_base``; llama.cpp's K-quants in ``kquants``.
"""

from __future__ import annotations

import re
from typing import Iterator
from functools import cache, lru_cache

import numpy as np

from quantfab.tasks.quantize.grid_base import (AsymmetricGrid, Encoded, Grid, GridRequest, SymmetricGrid,
                                               inverse_or_zero)
from quantfab.tasks.quantize.float_grids import FP8BlockGrid, FP8ChannelGrid, FP8Grid
from quantfab.tasks.quantize.fp4_grids import GGMLMXFP4Grid, MXFP4Grid, NVFP4Grid
from quantfab.tasks.quantize.iq1_grids import IQ1_GRIDS
from quantfab.tasks.quantize.iq2_grids import IQ2_GRIDS
from quantfab.tasks.quantize.iq3_grids import IQ3_GRIDS
from quantfab.tasks.quantize.iq_grids import IQ4_GRIDS
from quantfab.tasks.quantize.mlx_grid import MLXAffineGrid
from quantfab.tasks.quantize.kquants import K_GRIDS, WEIGHTED_SEARCH, importance_weights, search
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

__all__ = ["GRIDS", "Encoded", "Grid", "GridRequest", "grid_named"]


class Q8_0(SymmetricGrid):
    """llama.cpp Q8_0: blocks of 32, d = amax / 127 (fp16), q = roundf(x / d)."""

    name, bits, block, qmin, qmax = "Q8_0", 8, 32, -127, 127

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        return self.store_scale(np.abs(self.blocks(w)).max(axis=-1) * ratio / 127), None

    def reference(self, w: np.ndarray, importance: np.ndarray | None = None) -> Encoded:
        d = (np.abs(self.blocks(w)).max(axis=-1) / np.float32(127)).astype(np.float32)
        # llama.cpp encodes with the fp32 scale and stores it as fp16.
        return Encoded(self.encode(w, d, None), self.store_scale(d), None)


class SignedMaxGrid(SymmetricGrid):
    """llama.cpp Q4_0 / Q5_0: blocks of 32, d = max / qmin (the signed extreme maps to qmin), fp16 d."""

    block = 32

    def _signed_max(self, w: np.ndarray) -> np.ndarray:
        b = self.blocks(w)
        idx = np.abs(b).argmax(axis=-1)[..., None]
        return np.take_along_axis(b, idx, axis=-1)[..., 0]

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        return self.store_scale(self._signed_max(w) * np.float32(ratio) / np.float32(self.qmin)), None

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        # llama.cpp: q = min(qmax - qmin, (int8)(x * id - qmin + 0.5)) + qmin; floor equals the C cast once >= 0.
        q = np.floor(x * inverse_or_zero(d) + np.float32(0.5 - self.qmin))
        return (np.clip(q, 0, self.qmax - self.qmin) + self.qmin).astype(np.int8)

    def reference(self, w: np.ndarray, importance: np.ndarray | None = None) -> Encoded:
        if importance is not None:
            return self.weighted(w, importance)
        d = (self._signed_max(w) / np.float32(self.qmin)).astype(np.float32)
        return Encoded(self.encode(w, d, None), self.store_scale(d), None)

    def weighted(self, w: np.ndarray, importance: np.ndarray) -> Encoded:
        """quantize_row_q{4,5}_0_impl: each block's scale fitted to the importance-weighted error (make_qx_quants),
        its codes the search's."""
        x = w.reshape(-1, self.block).astype(np.float32)
        scale, codes = search.search_signed_scale(x, importance_weights(x, importance, w.shape[1], 1.0), -self.qmin)
        return Encoded((codes + self.qmin).reshape(w.shape).astype(np.int8),
                       self.store_scale(scale).reshape(w.shape[0], -1), None)


class Q4_0(SignedMaxGrid):
    name, bits, qmin, qmax = "Q4_0", 4, -8, 7


class Q5_0(SignedMaxGrid):
    name, bits, qmin, qmax = "Q5_0", 5, -16, 15


class MinMaxGrid(AsymmetricGrid):
    """llama.cpp Q4_1 / Q5_1: blocks of 32, d = (max - min) / qmax and m = min (both fp16), q in [0, qmax]."""

    block = 32

    def reference(self, w: np.ndarray, importance: np.ndarray | None = None) -> Encoded:
        if importance is not None:
            return self.weighted(w, importance)
        b = self.blocks(w)
        lo = b.min(axis=-1)
        d = ((b.max(axis=-1) - lo) / np.float32(self.qmax)).astype(np.float32)
        # llama.cpp encodes with fp32 d and min, then stores both as fp16.
        return Encoded(self.encode(w, d, lo), self.store_scale(d), self.store_scale(lo))

    def weighted(self, w: np.ndarray, importance: np.ndarray) -> Encoded:
        """quantize_row_q{4,5}_1_impl: each block's scale and min fitted to the importance-weighted error
        (make_qkx3_quants), its codes the search's."""
        x = w.reshape(-1, self.block).astype(np.float32)
        scale, mins, codes = search.search_min_scale(x, importance_weights(x, importance, w.shape[1], 1.0), self.qmax,
                                                     *WEIGHTED_SEARCH)
        blocks = (w.shape[0], w.shape[1] // self.block)
        return Encoded(codes.reshape(w.shape).astype(np.int8), self.store_scale(scale).reshape(blocks),
                       self.store_scale(-mins).reshape(blocks))


class Q4_1(MinMaxGrid):
    name, bits, qmax = "Q4_1", 4, 15


class Q5_1(MinMaxGrid):
    name, bits, qmax = "Q5_1", 5, 31


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
        return self._scales(b.max(axis=-1), b.min(axis=-1), ratio)

    def scales_for_ratios(self, w: np.ndarray, ratios: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        b = self.blocks(w)
        top, bottom = b.max(axis=-1), b.min(axis=-1)  # once for every ratio
        for ratio in ratios:
            yield self._scales(top, bottom, float(ratio))

    def _scales(self, top: np.ndarray, bottom: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        hi, lo = top * np.float32(ratio), bottom * np.float32(ratio)
        levels = np.float32(self.qmax - self.qmin)
        if self.symmetric:
            return self.store_scale(np.maximum(np.abs(hi), np.abs(lo)) / (levels / 2)), None
        hi, lo = np.maximum(hi, 0), np.minimum(lo, 0)
        d = self.store_scale((hi - lo) / levels)
        z = np.clip(np.rint(self.qmin - lo * inverse_or_zero(d)), self.qmin, self.qmax).astype(np.float32)
        return d, z

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return self._codes(x, d, m).astype(np.int8)

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        q = q.astype(np.float32)
        if m is not None:
            q -= m
        return np.multiply(d, q, out=q)

    def round_trip(self, w: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        """_codes then decode_values, the same float32 operations in the same order, in torch: a search runs
        this for every candidate scale, and torch's kernels for a per-block broadcast are twice NumPy's."""
        x = torch.from_numpy(self.blocks(w))
        dt = torch.from_numpy(d)[..., None]
        q = torch.mul(x, torch.from_numpy(inverse_or_zero(d))[..., None])
        q.round_()  # half to even, as np.rint
        if m is not None:
            mt = torch.from_numpy(m)[..., None]
            q.add_(mt)
        q.clamp_(self.qmin, self.qmax)
        if m is not None:
            q.sub_(mt)
        return q.mul_(dt).numpy().reshape(w.shape)

    def _codes(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        """Integer-valued float32 codes, computed in place."""
        q = np.multiply(x, inverse_or_zero(d), dtype=np.float32)
        np.rint(q, out=q)
        if m is not None:
            q += m
        return np.clip(q, self.qmin, self.qmax, out=q)


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


@cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), the same float32 values
    (torch's float32 linspace, which numpy's does not round alike); made on first use."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return np.array(sorted(data), dtype=np.float32)


def blockwise_8bit(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest dynamic-map index of x / absmax per block of ``block`` (the last block may be short)."""
    code = dynamic_map()
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
    values = dynamic_map()[codes.astype(np.int64)]
    pad = (-n) % block
    vb = np.concatenate([values, np.zeros(pad, np.float32)]).reshape(-1, block)
    return (vb * absmax[:, None]).astype(np.float32).reshape(-1)[:n]


GRIDS: dict[str, Grid] = {g.name: g for g in (Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1(), *K_GRIDS, *IQ4_GRIDS,
                                              *IQ3_GRIDS, *IQ2_GRIDS, *IQ1_GRIDS,
                                              GGMLMXFP4Grid())}
FP4_GRIDS: dict[str, Grid] = {g.name: g for g in (NVFP4Grid(), MXFP4Grid())}
_PARAMETRIC = re.compile(r"^(?:INT(?P<bits>[2-8])_(?:G(?P<group>\d+)|(?P<ch>CH))_(?P<sym>SYM|ASYM)"
                         r"|NF4_B(?P<nf4>\d+)(?P<dq>_DQ)?|FP8_(?:G(?P<fp8>\d+)|(?P<fp8ch>CH)|B(?P<fp8b>\d+))"
                         r"|MLX(?P<mlx>[2-8])_G(?P<mlxg>\d+)_(?P<mlxt>F16|BF16|F32))$")


@lru_cache(maxsize=None)
def grid_named(name: str) -> Grid:
    """The grid called ``name``: a fixed grid (GGUF's, NVFP4, MXFP4), INT{bits}_{G{group}|CH}_{SYM|ASYM},
    NF4_B{block}[_DQ], FP8_{G{group}|CH|B{n}} or MLX{bits}_G{group}_{F16|BF16|F32}."""
    if name in GRIDS or name in FP4_GRIDS:
        return GRIDS.get(name) or FP4_GRIDS[name]
    found = _PARAMETRIC.match(name)
    if found is None:
        raise KeyError(f"no grid named {name}")
    if found["mlx"]:
        return MLXAffineGrid(int(found["mlx"]), int(found["mlxg"]), found["mlxt"])
    if found["fp8"]:
        return FP8Grid(int(found["fp8"]))
    if found["fp8b"]:
        return FP8BlockGrid(int(found["fp8b"]))
    if found["fp8ch"]:
        return FP8ChannelGrid()
    if found["nf4"]:
        return NF4Grid(int(found["nf4"]), bool(found["dq"]))
    if found["ch"]:
        return IntChannelGrid(int(found["bits"]), found["sym"] == "SYM")
    return IntGrid(int(found["bits"]), int(found["group"]), found["sym"] == "SYM")
