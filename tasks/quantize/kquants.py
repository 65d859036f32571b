"""llama.cpp's K-quants: super-blocks of 256 whose sub-block scales (and mins) are small integers times one
fp16 scale (and min) per super-block.

A K grid's ``block`` is its sub-block (16 or 32) and its ``span`` the super-block: ``Encoded.d`` holds each
sub-block's effective scale, fp16(d) * sc, and ``Encoded.m`` minus its effective min, -(fp16(dmin) * m), so
decoding is the d * q + m every grid shares and equals gguf-py's dequantize bit for bit. ``split`` recovers
the stored integers where the scale rule maps the largest scale to the extreme integer (the reference rule,
GPTQ's and AWQ's); the importance-weighted rule searches the super-block scale too, so its ``Encoded.extra``
holds the stored fields themselves (``stored_fields`` reads either).

``reference`` is llama.cpp's quantize_row_q*_K_ref ported op for op in float32: sums accumulate in
element order, nearest_int rounds half to even, and it divides where llama.cpp divides, so rtn writes
the bytes llama-quantize writes. Given an importance per input column (llama.cpp's imatrix), it is
quantize_row_q*_K_impl instead, as llama-quantize --imatrix runs it. ``scale_candidates`` (what GPTQ, AWQ and
the clip searches use) starts from each sub-block's range instead, then quantizes the sub-block scales to the
super-block exactly as the reference does.
"""

from __future__ import annotations

import numpy as np

from quantfab.tasks.lazy import lazy
from quantfab.tasks.quantize.grid_base import AsymmetricGrid, Encoded, Grid, SymmetricGrid

search = lazy("quantfab.kernels.kquant_search")  # the searches below as kernels (C on the CPU, CUDA on a GPU)

F = np.float32
GROUP_MAX_EPS = F(1e-15)
SUPER = 256


def nearest_int(x: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int, the same 1.5 * 2**23 trick: round half to even within +-4194303 (all that its
    callers should pass), and the same integer as llama.cpp's outside."""
    shifted = np.empty(np.shape(x), F)
    np.add(x, F(12582912), out=shifted, dtype=F)
    bits = shifted.view(np.int32)
    np.bitwise_and(bits, 0x007FFFFF, out=bits)
    bits -= 0x00400000
    return bits


def _in_range(x: np.ndarray) -> np.ndarray:
    """Values nearest_int rounds right, the others clipped into its range: codes a method (GPTQ's error feedback)
    pushes far past a block's range come out clipped, where llama.cpp's own scales never get there."""
    return np.clip(x, F(-4194303), F(4194303))


def _fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, F).astype(np.float16).astype(F)


def _safe(x: np.ndarray) -> np.ndarray:
    return np.where(x == 0, F(1), x).astype(F)


def _columns(x: np.ndarray) -> np.ndarray:
    """(rows, n) -> contiguous (n, rows): the element-order loops below walk columns, which is fast this way."""
    return np.ascontiguousarray(x.T, dtype=F)


def row_sums(x: np.ndarray) -> np.ndarray:
    """Each row's sum in element order, as llama.cpp's loops add."""
    total = np.zeros(len(x), F)
    for column in _columns(x):
        total = total + column
    return total


def row_sums_of_squares(x: np.ndarray) -> np.ndarray:
    """Each row's sum of x * x in element order."""
    total = np.zeros(len(x), F)
    for column in _columns(x):
        total = total + column * column
    return total


def importance_weights(x: np.ndarray, importance: np.ndarray, span: int, factor: float) -> np.ndarray:
    """llama.cpp's weights under an importance matrix, qw * sqrt(sigma2 + x^2), for blocks ``x`` (rows of one block,
    in memory order) of a tensor whose columns have ``importance``: sigma2 = factor * (sum of x^2 over the ``span``
    holding the block) / span, the *_impl functions' (span: a super-block, or the whole row for Q4_0..Q5_1)."""
    block = x.shape[1]
    sigma2 = np.repeat(F(factor) * row_sums_of_squares(x.reshape(-1, span)) / F(span), span // block)
    qw = np.tile(importance.astype(F).reshape(-1, block), (x.size // importance.size, 1))
    return (qw * np.sqrt(sigma2[:, None] + x * x)).astype(F)


def search_min_scale_reference(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants for every row of ``x`` (one sub-block each): (scale, min as a positive offset, codes)."""
    n = x.shape[1]
    xc, wc = _columns(x), _columns(weights)
    lo, hi = x.min(axis=1), x.max(axis=1)
    sum_w = wc[0].copy()
    sum_x = sum_w * xc[0]
    for i in range(1, n):
        sum_w = sum_w + wc[i]
        sum_x = sum_x + wc[i] * xc[i]
    lo = np.where(lo > 0, F(0), lo).astype(F)  # llama.cpp: if (min > 0) min = 0 (a -0 stays -0)
    flat = hi == lo
    iscale = F(nmax) / _safe(hi - lo)
    scale = F(1) / iscale
    codes = np.clip(nearest_int(iscale * (xc - lo)), 0, nmax)  # (n, rows), as every array here

    def error(s: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
        total = np.zeros(len(x), F)
        qc = q.astype(F)
        for i in range(n):
            diff = s * qc[i] + m - xc[i]
            total = total + wc[i] * (np.abs(diff) if use_mad else diff * diff)
        return total

    best = error(scale, lo, codes)
    for step in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / _safe(hi - lo)  # lo moves with the best fit
        aux = np.clip(nearest_int(iscale * (xc - lo)), 0, nmax)
        sum_l = np.zeros(len(x), F)
        sum_l2 = np.zeros(len(x), F)
        sum_xl = np.zeros(len(x), F)
        auxc = aux.astype(F)
        for i in range(n):
            w, q = wc[i], auxc[i]
            sum_l = sum_l + w * q
            sum_l2 = sum_l2 + w * q * q
            sum_xl = sum_xl + w * q * xc[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / _safe(det)
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / _safe(det)
        positive = this_min > 0
        this_scale = np.where(positive, sum_xl / _safe(sum_l2), this_scale).astype(F)
        this_min = np.where(positive, F(0), this_min).astype(F)
        current = error(this_scale, this_min, aux)
        better = ok & (current < best)
        codes = np.where(better, aux, codes)
        best = np.where(better, current, best)
        scale = np.where(better, this_scale, scale).astype(F)
        lo = np.where(better, this_min, lo).astype(F)
    codes = np.where(flat, 0, codes)
    scale = np.where(flat, F(0), scale).astype(F)
    return scale, (-lo).astype(F), codes.T


def _signed_extreme(x: np.ndarray) -> np.ndarray:
    """The element of largest magnitude per row, the first one on ties (llama.cpp's strict >)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]


def _weighted_sums(xc: np.ndarray, wc: np.ndarray, qc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum w*x*l and sum w*l*l, in element order, over columns (n, rows)."""
    sumlx = np.zeros(xc.shape[1], F)
    suml2 = np.zeros(xc.shape[1], F)
    for i in range(len(xc)):
        w, l = wc[i], qc[i].astype(F)
        sumlx = sumlx + w * xc[i] * l
        suml2 = suml2 + w * l * l
    return sumlx, suml2


def search_signed_scale_reference(x: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, weights) per row: (scale, codes in [0, 2 nmax)). llama.cpp's
    weights without an importance matrix are x * x."""
    extreme = _signed_extreme(x)
    zero = np.abs(extreme) < GROUP_MAX_EPS
    extreme = _safe(extreme)
    xc, wc = _columns(x), _columns(weights)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = np.clip(nearest_int(iscale * xc), -nmax, nmax - 1)
        sumlx, suml2 = _weighted_sums(xc, wc, q)
        return q, sumlx, suml2

    q, sumlx, suml2 = trial(-F(nmax) / extreme)
    scale = np.where(suml2 != 0, sumlx / _safe(suml2), F(0)).astype(F)
    best = scale * sumlx
    codes = q + nmax
    for step in range(-9, 10):
        if step == 0:
            continue
        q, sumlx, suml2 = trial(-(F(nmax) + F(0.1) * F(step)) / extreme)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        codes = np.where(better, q + nmax, codes)
        scale = np.where(better, sumlx / _safe(suml2), scale).astype(F)
        best = np.where(better, scale * sumlx, best).astype(F)
    return np.where(zero, F(0), scale).astype(F), np.where(zero, 0, codes).T


def search_q3_scale(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) per row: (scale, codes in [0, 2 nmax))."""
    n = x.shape[1]
    extreme = _signed_extreme(x)
    zero = np.abs(extreme) < GROUP_MAX_EPS
    xc = _columns(x)
    qc = np.clip(nearest_int(F(-nmax) / _safe(extreme) * xc), -nmax, nmax - 1)
    sumlx, suml2 = _weighted_sums(xc, xc * xc, qc)
    active = np.ones(len(x), bool)
    for _ in range(5):
        changed = np.zeros(len(x), bool)
        for i in range(n):
            xi, li = xc[i], qc[i].astype(F)
            w = xi * xi
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            new = np.clip(nearest_int(xi * sl2 / _safe(slx)), -nmax, nmax - 1)
            nf = new.astype(F)
            slx_new = slx + w * xi * nf
            sl2_new = sl2 + w * nf * nf
            take = (active & (slx > 0) & (new != qc[i]) & (sl2_new > 0)
                    & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            qc[i] = np.where(take, new, qc[i])
            sumlx = np.where(take, slx_new, sumlx).astype(F)
            suml2 = np.where(take, sl2_new, suml2).astype(F)
            changed |= take
        active &= changed
    scale = np.where(suml2 > 0, sumlx / _safe(suml2), F(0)).astype(F)
    return np.where(zero, F(0), scale).astype(F), np.where(zero, 0, qc + nmax).T


def search_positive_scale_reference(x: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(n, nmax, x, L, weights) per row: one scale for non-negative values (a super-block's sub-block
    scales or mins) and their integers in [0, nmax], fitted by weighted least squares: (scale, integers). A negative
    value (IQ2_XXS/XS feed one per group: the sign they keep) gets an integer that wraps modulo 256 where llama.cpp
    stores it, in its uint8_t L, and reads it back."""
    n = x.shape[1]
    xc, wc = _columns(x), _columns(weights)
    top = np.zeros(len(x), F)
    for column in xc:
        top = np.where(top > column, top, column).astype(F)  # MAX(max, x[i])
    zero = top < GROUP_MAX_EPS
    top = np.where(zero, F(1), top).astype(F)

    def error(scale: np.ndarray, q: np.ndarray) -> np.ndarray:
        total = np.zeros(len(x), F)
        for i in range(n):
            diff = xc[i] - scale * q[i].astype(F)
            total = total + wc[i] * diff * diff
        return total

    iscale = F(nmax) / top
    best = error(F(1) / iscale, nearest_int(iscale * xc) & 255)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial = (F(0.1) * F(step) + F(nmax)) / top
        current = error(F(1) / trial, np.minimum(nmax, nearest_int(trial * xc)))
        better = current < best
        best = np.where(better, current, best).astype(F)
        iscale = np.where(better, trial, iscale).astype(F)
    q = np.minimum(nmax, nearest_int(iscale * xc))
    sumlx, suml2 = _weighted_sums(xc, wc, q)
    q = q & 255
    for _ in range(5):  # llama.cpp stops at a round that changes nothing: the rounds after it would change nothing
        for i in range(n):
            w, xi, li = wc[i], xc[i], q[i].astype(F)
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            fits = (slx > 0) & (sl2 > 0)
            new = np.minimum(nmax, nearest_int(xi * sl2 / np.where(fits, slx, F(1))))
            nf = new.astype(F)
            slx_new = slx + w * xi * nf
            sl2_new = sl2 + w * nf * nf
            take = fits & (new != q[i]) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            q[i] = np.where(take, new & 255, q[i])
            sumlx = np.where(take, slx_new, sumlx).astype(F)
            suml2 = np.where(take, sl2_new, suml2).astype(F)
    scale = np.where(suml2 > 0, sumlx / _safe(suml2), F(0)).astype(F)
    return np.where(zero, F(0), scale).astype(F), np.ascontiguousarray(np.where(zero, 0, q).T)


WEIGHTED_SEARCH = (-0.9, 0.05, 36, False)  # make_qkx3_quants' rmin, rdelta, nstep, use_mad in every *_impl


class KGrid(Grid):
    """Base of the K grids: sub-blocks of ``block`` inside super-blocks of 256."""

    scale_dtype = np.float32  # effective scales are fp16 x integer products, exact in float32

    @property
    def span(self) -> int:
        return SUPER

    def subblocks(self, w: np.ndarray) -> np.ndarray:
        """(rows * cols / block, block): one row per sub-block, in memory order."""
        return w.reshape(-1, self.block).astype(F)

    def per_super(self, x: np.ndarray) -> np.ndarray:
        """(sub-blocks,) -> (super-blocks, sub-blocks per super-block)."""
        return x.reshape(-1, SUPER // self.block)

    def codes_for(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None, fallback: np.ndarray) -> np.ndarray:
        """llama.cpp's final pass: codes against the stored scales; a zero scale keeps the search's codes."""
        q = self.encode_values(x, d[:, None], None if m is None else m[:, None])
        return np.where(d[:, None] == 0, fallback, q)

    def finish(self, w: np.ndarray, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None,
               stored: dict[str, np.ndarray] | None = None) -> Encoded:
        rows, cols = w.shape
        shape = (rows, cols // self.block)
        return Encoded(codes.reshape(w.shape).astype(np.int8), d.reshape(shape), None if m is None else m.reshape(shape),
                       stored or {})

    def split(self, d: np.ndarray, m: np.ndarray | None) -> dict[str, np.ndarray]:
        """The stored fields of every super-block (rows * super-blocks first) from effective scales and mins."""
        raise NotImplementedError

    def stored_fields(self, enc: Encoded) -> dict[str, np.ndarray]:
        """The stored fields of every super-block: those the scale search chose, or else ``split``'s."""
        if enc.extra:
            return enc.extra
        return self.split(enc.d.reshape(-1), None if enc.m is None else enc.m.reshape(-1))



class MinKGrid(KGrid, AsymmetricGrid):
    """Q2_K, Q4_K, Q5_K: value = fp16(d) * sc * q - fp16(dmin) * m with unsigned q, sc and m."""

    levels: int  # the largest sub-block scale / min integer
    search: tuple[float, float, int, bool]  # make_qkx2_quants' rmin, rdelta, nstep, use_mad
    sigma_factor: float  # sigma2 = sigma_factor * mean x^2 over the super-block, under an importance matrix

    def weights(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def quantize_scales(self, scales: np.ndarray, mins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sub-block float scales and (positive) mins -> effective stored scales and minus the stored mins."""
        s, mn = self.per_super(scales), self.per_super(mins)
        max_scale = np.maximum(s.max(axis=1), F(0))
        max_min = np.maximum(mn.max(axis=1), F(0))
        inv_scale = np.where(max_scale > 0, F(self.levels) / _safe(max_scale), F(0)).astype(F)
        inv_min = np.where(max_min > 0, F(self.levels) / _safe(max_min), F(0)).astype(F)
        sc = np.clip(nearest_int(inv_scale[:, None] * s), 0, self.levels)
        mi = np.clip(nearest_int(inv_min[:, None] * mn), 0, self.levels)
        d = _fp16(max_scale / F(self.levels))
        dmin = _fp16(max_min / F(self.levels))
        return (d[:, None] * sc.astype(F)).reshape(-1), (-(dmin[:, None] * mi.astype(F))).reshape(-1)

    def reference(self, w: np.ndarray, importance: np.ndarray | None = None) -> Encoded:
        if importance is not None:
            return self.weighted(w, importance)
        x = self.subblocks(w)
        rmin, rdelta, nstep, use_mad = self.search
        scales, mins, codes = search.search_min_scale(x, self.weights(x), self.qmax, rmin, rdelta, nstep, use_mad)
        d, m = self.quantize_scales(scales, mins)
        return self.finish(w, self.codes_for(x, d, m, codes), d, m)

    def weighted(self, w: np.ndarray, importance: np.ndarray) -> Encoded:
        """quantize_row_q{2,4,5}_K_impl: each sub-block's scale and min fitted to the importance-weighted error,
        then the super-block's scale and min searched for those (make_qp_quants, weighted by each sub-block's
        weight), where the reference maps the largest to the top integer."""
        x = self.subblocks(w)
        weights = importance_weights(x, importance, SUPER, self.sigma_factor)
        scales, mins, codes = search.search_min_scale(x, weights, self.qmax, *WEIGHTED_SEARCH)
        per_block = self.per_super(row_sums(weights))
        d, sc = search_positive_scale_reference(self.per_super(scales), per_block, self.levels)
        dmin, mi = search_positive_scale_reference(self.per_super(mins), per_block, self.levels)
        d, dmin = _fp16(d), _fp16(dmin)
        eff_d = (d[:, None] * sc.astype(F)).reshape(-1)
        eff_m = (-(dmin[:, None] * mi.astype(F))).reshape(-1)
        stored = {"d": d, "dmin": dmin, "scales": sc.astype(np.uint8), "mins": mi.astype(np.uint8)}
        return self.finish(w, self.codes_for(x, eff_d, eff_m, codes), eff_d, eff_m, stored)

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        x = self.subblocks(w)
        hi, lo = x.max(axis=1) * F(ratio), np.minimum(x.min(axis=1), F(0)) * F(ratio)
        d, m = self.quantize_scales(((hi - lo) / F(self.qmax)).astype(F), (-lo).astype(F))
        shape = (w.shape[0], w.shape[1] // self.block)
        return d.reshape(shape), m.reshape(shape)

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        assert m is not None
        q = nearest_int(_in_range((x - m) / _safe(d)))  # llama.cpp: (x + dmin * m) / d
        return np.where(d == 0, 0, np.clip(q, 0, self.qmax)).astype(np.int8)

    def split(self, d: np.ndarray, m: np.ndarray | None) -> dict[str, np.ndarray]:
        assert m is not None
        s, mn = self.per_super(d), self.per_super(-m)
        top, top_min = s.max(axis=1), mn.max(axis=1)
        sc = np.rint(s / _safe(top / F(self.levels))[:, None]).astype(np.uint8)
        mi = np.rint(mn / _safe(top_min / F(self.levels))[:, None]).astype(np.uint8)
        return {"d": top / F(self.levels), "dmin": top_min / F(self.levels), "scales": sc, "mins": mi}


class Q2_K(MinKGrid):
    name, bits, block, qmax, levels = "Q2_K", 2, 16, 3, 15
    search = (-0.5, 0.1, 15, True)
    sigma_factor = 1.0

    def weights(self, x: np.ndarray) -> np.ndarray:
        return np.abs(x)


class Q4_K(MinKGrid):
    name, bits, block, qmax, levels = "Q4_K", 4, 32, 15, 63
    search = (-1.0, 0.1, 20, False)

    sigma_factor = 2.0

    def weights(self, x: np.ndarray) -> np.ndarray:
        return (np.sqrt(row_sums_of_squares(x) / F(x.shape[1]))[:, None] + np.abs(x)).astype(F)


class Q5_K(Q4_K):
    name, bits, qmax = "Q5_K", 5, 31
    search = (-0.5, 0.1, 15, False)


class SignedKGrid(KGrid, SymmetricGrid):
    """Q3_K, Q6_K: value = fp16(d) * sc * q with signed sc and q; the largest |scale| maps to sc = qmin_scale."""

    scale_min: int  # the integer the sub-block with the largest |scale| gets (-32 or -128)
    scale_max: int
    zero_scale: int  # the integer llama.cpp stores when a whole super-block is zero

    def search_scales(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def weighted(self, w: np.ndarray, importance: np.ndarray) -> Encoded:
        raise NotImplementedError

    def quantize_scales(self, scales: np.ndarray) -> np.ndarray:
        s = self.per_super(scales)
        top = _signed_extreme(s)
        iscale = F(self.scale_min) / _safe(top)
        sc = np.clip(nearest_int(iscale[:, None] * s), self.scale_min, self.scale_max)
        zero = self.zero_super(top)
        sc = np.where(zero[:, None], self.zero_scale, sc)  # what llama.cpp stores, so 0 * sc keeps its sign of zero
        d = np.where(zero, F(0), _fp16(F(1) / iscale)).astype(F)
        return (d[:, None] * sc.astype(F)).reshape(-1)

    def zero_super(self, top: np.ndarray) -> np.ndarray:
        return top == 0

    def reference(self, w: np.ndarray, importance: np.ndarray | None = None) -> Encoded:
        if importance is not None:
            return self.weighted(w, importance)
        x = self.subblocks(w)
        scales, codes = self.search_scales(x)
        d = self.quantize_scales(scales)
        return self.finish(w, self.codes_for(x, d, None, codes + self.qmin), d, None)

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        x = self.subblocks(w)
        d = self.quantize_scales((_signed_extreme(x) * F(ratio) / F(self.qmin)).astype(F))
        return d.reshape(w.shape[0], w.shape[1] // self.block), None

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        q = nearest_int(_in_range(x / _safe(d)))
        return np.where(d == 0, 0, np.clip(q, self.qmin, self.qmax)).astype(np.int8)

    def split(self, d: np.ndarray, m: np.ndarray | None) -> dict[str, np.ndarray]:
        s = self.per_super(d)
        top = _signed_extreme(s) / F(self.scale_min)
        top = np.where(top == 0, F(0), top).astype(F)  # +0 as llama.cpp stores it, not the -0 that 0 / -128 gives
        sc = np.where(top[:, None] == 0, self.zero_scale, np.rint(s / _safe(top)[:, None]))
        return {"d": top, "scales": sc.astype(np.int8)}


class Q3_K(SignedKGrid):
    name, bits, block, qmin, qmax = "Q3_K", 3, 16, -4, 3
    scale_min, scale_max, zero_scale = -32, 31, -32

    def search_scales(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return search_q3_scale(x, 4)

    def weighted(self, w: np.ndarray, importance: np.ndarray) -> Encoded:
        """quantize_row_q3_K_impl: sub-block scales fitted to the importance-weighted error (make_qx_quants),
        then the super-block scale and the 6-bit integers fitted to them, weighted by each sub-block's weight."""
        x = self.subblocks(w)
        weights = importance_weights(x, importance, SUPER, 2.0)
        scales, codes = search.search_signed_scale(x, weights, -self.qmin)
        d, sc = search.search_signed_scale(self.per_super(scales), self.per_super(row_sums(weights)), -self.scale_min)
        d = _fp16(d)
        sc = (sc + self.scale_min).astype(np.int8)  # [0, 64) -> [-32, 32)
        eff = (d[:, None] * sc.astype(F)).reshape(-1)
        return self.finish(w, self.codes_for(x, eff, None, codes + self.qmin), eff, None, {"d": d, "scales": sc})


class Q6_K(SignedKGrid):
    name, bits, block, qmin, qmax = "Q6_K", 6, 16, -32, 31
    scale_min, scale_max, zero_scale = -128, 127, 0

    def search_scales(self, x: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return search.search_signed_scale(x, x * x if weights is None else weights, 32)

    def weighted(self, w: np.ndarray, importance: np.ndarray) -> Encoded:
        """quantize_row_q6_K_impl: sub-block scales fitted with the importance itself as weights; the super-block
        scale as without."""
        x = self.subblocks(w)
        qw = np.tile(importance.astype(F).reshape(-1, self.block), (w.shape[0], 1))
        scales, codes = self.search_scales(x, qw)
        d = self.quantize_scales(scales)
        return self.finish(w, self.codes_for(x, d, None, codes + self.qmin), d, None)

    def zero_super(self, top: np.ndarray) -> np.ndarray:
        return np.abs(top) < GROUP_MAX_EPS


K_GRIDS: tuple[Grid, ...] = (Q2_K(), Q3_K(), Q4_K(), Q5_K(), Q6_K())
