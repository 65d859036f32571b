"""llama.cpp's non-linear 4-bit grids: codes index ``kvalues_iq4nl``, 16 values spaced closer near zero, as the
weights of a trained model are.

IQ4_NL holds one fp16 scale per block of 32 (18 bytes: 4.5 bits per weight); IQ4_XS one fp16 scale per
super-block of 256 and a 6-bit integer per 32-block (136 bytes: 4.25 bits per weight). ``Encoded.d`` holds each
block's effective scale (IQ4_XS: fp16(d) * l), so a value decodes as d * kvalues[q], as gguf-py's dequantize
computes it.

``reference`` is llama.cpp's quantize_iq4_nl / quantize_iq4_xs (quantize_row_iq4_nl_impl with 7 trials either
side of the extreme), ported op for op in float32 with weights x * x, or under an importance matrix
qw * sqrt(sigma2 + x^2), so rtn writes the bytes llama-quantize writes with or without --imatrix. An IQ4_XS
encoding from the reference keeps the stored fields in ``extra`` (its codes are chosen against the fp32 scale,
so the fields are not recovered from the effective scales in every case); ``scale_candidates`` (GPTQ, AWQ, the
clip searches) maps each block's extreme to -127, and the largest sub-block scale to the 6-bit -32.
"""

from __future__ import annotations

import numpy as np

from quantfab.tasks.quantize.grid_base import Encoded, Grid, inverse_or_zero
from quantfab.tasks.quantize.kquants import (GROUP_MAX_EPS, _columns, _fp16, _signed_extreme, importance_weights,
                                             nearest_int)

F = np.float32
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)  # kvalues_iq4nl
TRIALS = 7  # quantize_iq4_nl / _xs pass ntry = 7


def best_index(x: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues_iq4nl, x): the nearest value's index, the upper one on a tie."""
    upper = np.clip(np.searchsorted(KVALUES, x, side="right"), 1, len(KVALUES) - 1)
    nearer = np.where(x - KVALUES[upper - 1] < KVALUES[upper] - x, upper - 1, upper)
    return np.where(x <= KVALUES[0], 0, np.where(x >= KVALUES[-1], len(KVALUES) - 1, nearer)).astype(np.int8)


def _fit(xc: np.ndarray, wc: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum w*v*x and sum w*v*v over columns (n, blocks), v = kvalues[q], in element order."""
    sumqx = np.zeros(xc.shape[1], F)
    sumq2 = np.zeros(xc.shape[1], F)
    for i in range(len(xc)):
        v = KVALUES[q[i]]
        sumqx = sumqx + wc[i] * v * xc[i]
        sumq2 = sumq2 + wc[i] * v * v
    return sumqx, sumq2


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, F(1)), F(0)).astype(F)


def search_block_scales_reference(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each 32-block's (row's) scale in quantize_row_iq4_nl_impl: fitted to the codes of the extreme's scale, then
    to those of 2 * TRIALS + 1 scales about it where they fit better; 0 for a block of zeros."""
    xc, wc = _columns(x), _columns(weights)
    extreme = _signed_extreme(x)
    zero = np.abs(extreme) < GROUP_MAX_EPS
    extreme = np.where(zero, F(1), extreme).astype(F)
    d = (-extreme / KVALUES[0]).astype(F)
    sumqx, sumq2 = _fit(xc, wc, best_index((F(1) / d) * xc))
    d = _ratio(sumqx, sumq2)
    best = d * sumqx
    for step in range(-TRIALS, TRIALS + 1):
        sumqx, sumq2 = _fit(xc, wc, best_index(((F(step) + KVALUES[0]) / extreme) * xc))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, _ratio(sumqx, sumq2), d).astype(F)
        best = np.where(better, d * sumqx, best).astype(F)
    return np.where(zero, F(0), d).astype(F)


class IQ4NLGrid(Grid):
    """IQ4_NL: value = fp16(d) * kvalues_iq4nl[q] in blocks of 32."""

    name, bits, block, qmin, qmax, symmetric = "IQ4_NL", 4, 32, 0, 15, True
    scale_dtype = np.float16

    def weights(self, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        """x * x, or qw * sqrt(sigma2 + x^2) with sigma2 = 2 * mean x^2 over the span (llama.cpp's weights)."""
        if importance is None:
            return (x * x).astype(F)
        return importance_weights(x, importance, self.span, 2.0)

    def reference(self, w: np.ndarray, importance: np.ndarray | None = None) -> Encoded:
        x = w.reshape(-1, self.block).astype(F)
        d = search_block_scales_reference(x, self.weights(x, importance))
        codes = best_index(inverse_or_zero(d)[:, None] * x)  # against the fp32 scale, as llama.cpp
        return Encoded(codes.reshape(w.shape), self.store_scale(d).reshape(w.shape[0], -1), None)

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        return self.store_scale(_signed_extreme(w.reshape(-1, self.block)) * F(ratio) / KVALUES[0]).reshape(
            w.shape[0], -1), None

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return best_index(x * inverse_or_zero(d))

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return np.multiply(d, KVALUES[q.astype(np.intp)], dtype=np.float32)


class IQ4XSGrid(IQ4NLGrid):
    """IQ4_XS: value = fp16(d) * l * kvalues_iq4nl[q], l a 6-bit integer in [-32, 31] per 32-block of a 256."""

    name = "IQ4_XS"
    scale_dtype = np.float32  # effective scales are fp16 x integer products, exact in float32

    @property
    def span(self) -> int:
        return 256

    def reference(self, w: np.ndarray, importance: np.ndarray | None = None) -> Encoded:
        x = w.reshape(-1, self.block).astype(F)
        scales = search_block_scales_reference(x, self.weights(x, importance)).reshape(-1, self.span // self.block)
        d = (-_signed_extreme(scales) / F(32)).astype(F)
        levels = np.clip(nearest_int(inverse_or_zero(d)[:, None] * scales), -32, 31)
        exact = (d[:, None] * levels.astype(F)).reshape(-1)  # the fp32 scale the codes are chosen against
        codes = best_index(inverse_or_zero(exact)[:, None] * x)
        stored = _fp16(d)
        effective = (stored[:, None] * levels.astype(F)).reshape(w.shape[0], -1)
        return Encoded(codes.reshape(w.shape), effective, None, {"d": stored, "scales": levels.astype(np.int8)})

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        scales = (_signed_extreme(w.reshape(-1, self.block)) * F(ratio) / KVALUES[0]).astype(F)
        scales = scales.reshape(-1, self.span // self.block)
        d = (-_signed_extreme(scales) / F(32)).astype(F)
        levels = np.clip(nearest_int(inverse_or_zero(d)[:, None] * scales), -32, 31).astype(F)
        return (_fp16(d)[:, None] * levels).reshape(w.shape[0], -1), None

    def stored_fields(self, enc: Encoded) -> dict[str, np.ndarray]:
        """Per super-block: d (fp16 value) and the 6-bit scales; the reference's, or recovered from effective scales
        whose largest magnitude is -32 * d (``scale_candidates``')."""
        if enc.extra:
            return enc.extra
        s = enc.d.reshape(-1, self.span // self.block)
        top = _signed_extreme(s)
        d = np.where(top == 0, top, top / F(-32)).astype(F)  # a zero super-block keeps its zeros' sign: d * 0 is them
        return {"d": d, "scales": np.rint(s / np.where(d == 0, F(1), d)[:, None]).astype(np.int8)}


IQ4_GRIDS: tuple[Grid, ...] = (IQ4NLGrid(), IQ4XSGrid())
