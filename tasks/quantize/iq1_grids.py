"""llama.cpp's 1-bit lattice types: each group of 8 weights is one of 2048 points whose coordinates are -1, 0 or 1,
shifted by a delta of +-1/8 (the delta's sign is stored), times a 3-bit scale l worth d * (2l + 1) of the fp16
super-block d. A code is 8 * g +- 1 for the point's coordinate g, with d * (2l + 1) / 8 its scale, so d * code is
exactly what gguf-py's dequantize computes.

IQ1_S: one scale and one delta sign per 32 weights (50 bytes per 256: 1.56 bits per weight);
IQ1_M: one scale per 16 weights and a delta sign per group of 8, the fp16 d spread over the scales' top nibbles
(56 bytes per 256: 1.75 bits per weight).

``search_reference`` is llama.cpp's quantize_iq1_s / quantize_iq1_m (quantize_row_iq1_*_impl), ported op for op in
float32 over all blocks of all rows at once: a block's weights are sorted (equal values keep their order, as glibc's
qsort, a merge sort at these sizes, keeps them), every split of the sorted block into levels -1 / 0 / 1 is scored from
prefix sums under each delta sign in llama.cpp's order, a group whose levels are off the codebook goes to its best
neighbour, and the super-block scale follows from the largest block scale. IQ1_S needs an importance matrix, as
llama.cpp asserts one; IQ1_M weighs by x^2 without one, as its row quantizer does. ``search`` runs the same search
as a kernel (kernels/iq1_search.cu: C on every core, or CUDA) and reads the codes and scales back from its bytes.
"""

from __future__ import annotations

from functools import lru_cache

import gguf.quants
import numpy as np

from quantfab.tasks.lazy import lazy
from quantfab.tasks.quantize.kquants import _fp16, importance_weights, nearest_int
from quantfab.tasks.quantize.lattice import LatticeGrid, LatticeTable, lattice_table, stored_d


F = np.float32
SUPER = 256
GROUP = 8  # weights per codebook point
LEVELS = 3
PREFIX = 4  # coordinates whose terms are summed ahead for every combination of their levels
COST_ROW = LEVELS ** PREFIX + LEVELS * (GROUP - PREFIX) + 1
FLT_MAX = np.finfo(F).max
# Levels -1, 0, 1 shifted by +delta (row 0) and by -delta (row 1); the delta is 1/8 for both types.
SHIFTED = np.array([[-1 + 0.125, 0.125, 1 + 0.125], [-1 - 0.125, -0.125, 1 - 0.125]], F)
CHUNK = 16384  # blocks searched at once: a split's candidate rows stay in cache
NEAREST_CHUNK = 2048  # off-codebook groups whose neighbours are scored at once (their costs stay in cache)


def _table() -> LatticeTable:
    return lattice_table(gguf.quants.IQ1_S, 2, 3)


@lru_cache(maxsize=None)
def _neighbour_slots() -> tuple[np.ndarray, np.ndarray]:
    """For each key off the codebook (its slot): how many neighbours it has, and where each neighbour's terms sit
    in a group's cost row (``_costs``): its first 4 levels' combination, then each later coordinate's level
    (slots, 5, width); padding points at the row's inf."""
    table = _table()
    count = (table.neighbours >= 0).sum(axis=1)
    lv = ((table.points[np.maximum(table.neighbours, 0)].astype(np.int16) - 1) // 2).transpose(0, 2, 1)
    head = (lv[:, :PREFIX] * (LEVELS ** np.arange(PREFIX, dtype=np.int16))[:, None]).sum(axis=1, dtype=np.int16)
    tail = LEVELS ** PREFIX + LEVELS * np.arange(GROUP - PREFIX, dtype=np.int16)[:, None] + lv[:, PREFIX:]
    columns = np.concatenate([head[:, None], tail], axis=1)
    return count, np.where((table.neighbours < 0)[:, None, :], COST_ROW - 1, columns).astype(np.int16)


def _costs(x: np.ndarray, w: np.ndarray, scale: np.ndarray, shifted: np.ndarray) -> np.ndarray:
    """Each group's terms w * (scale * v - x)^2 (v its shifted levels, ``shifted`` (n, 3)) summed over the first 4
    coordinates for all 81 level combinations, in coordinate order, then each later coordinate's term per level,
    then inf -> (n, COST_ROW): a neighbour's sum is one combination plus 4 terms, added in llama.cpp's order."""
    n = len(x)
    term = np.empty((n, GROUP, LEVELS), F)
    for level in range(LEVELS):
        diff = scale[:, None] * shifted[:, level, None] - x
        term[:, :, level] = w * diff * diff
    head = term[:, 0]  # 0 + t == t: the first addition is exact
    for i in range(1, PREFIX):
        head = (head[:, None, :] + term[:, i, :, None]).reshape(n, -1)  # combination index: level i is 3^i's digit
    return np.concatenate([head, term[:, PREFIX:].reshape(n, -1), np.full((n, 1), np.inf, F)], axis=1)


class _Scan:
    """llama.cpp's running best over candidate (sum qx, sum q2) pairs offered in its order, for each block: one with
    q2 > 0 replaces the best when qx^2 > best * q2, best then being (qx / q2) * qx, starting from -FLT_MAX. The
    comparison is not exactly transitive in float32, so candidates are taken one at a time, as llama.cpp does; few
    replace the best after the first ones, so the scale and score are computed only for those."""

    def __init__(self, n: int):
        self.best = np.full(n, -FLT_MAX, F)
        self.win = np.full(n, -1, np.int32)  # the winner's number in the order offered
        self.scale = np.zeros(n, F)
        self.offered = 0
        self._lhs = np.empty(n, F)
        self._rhs = np.empty(n, F)
        self._take = np.empty(n, bool)

    def offer(self, qx: list[np.ndarray], q2: list[np.ndarray]) -> None:
        """Candidates (k, n) per variant: in llama.cpp's order, row by row, each row's variants in turn."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
            for t in range(len(qx[0])):
                for qxv, q2v in zip(qx, q2):
                    np.multiply(qxv[t], qxv[t], out=self._lhs)
                    np.multiply(self.best, q2v[t], out=self._rhs)
                    np.greater(self._lhs, self._rhs, out=self._take)
                    taken = np.flatnonzero(self._take)  # cheaper than a masked copy when few
                    taken = taken[q2v[t, taken] > 0]
                    scale = qxv[t, taken] / q2v[t, taken]
                    self.best[taken] = scale * qxv[t, taken]
                    self.scale[taken] = scale
                    self.win[taken] = self.offered
                    self.offered += 1


def _sort(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each block's ascending order, equal values in place, and each weight's rank in it."""
    order = np.argsort(xb, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(xb.shape[1])[None, :], axis=1)
    return order, rank


def _prefix(values: np.ndarray, mine: np.ndarray | None = None) -> np.ndarray:
    """Prefix sums (n + 1, blocks) of columns (n, blocks) added in order from 0, skipping where ``mine`` is False."""
    out = np.zeros((len(values) + 1, values.shape[1]), F)
    for j in range(len(values)):
        out[j + 1] = out[j] + values[j] if mine is None else np.where(mine[j], out[j] + values[j], out[j])
    return out


def _split(rank: np.ndarray, win: np.ndarray, splits: int, per_split: int) -> tuple[np.ndarray, np.ndarray]:
    """Levels 0 / 1 / 2 (n, size) of each block's winning split (below i1, below i2, the rest of the sorted block),
    candidates numbered per_split to a split (i1, i2) in llama.cpp's order; and the candidate's variant (sign)."""
    i1, i2 = np.triu_indices(splits + 1)
    pair, variant = np.maximum(win, 0) // per_split, np.maximum(win, 0) % per_split
    levels = (rank >= i1[pair][:, None]).astype(np.int8) + (rank >= i2[pair][:, None])
    return levels.astype(np.int8), variant


def _nearest(keys: np.ndarray, x: np.ndarray, w: np.ndarray, scale: np.ndarray, shifted: np.ndarray) -> np.ndarray:
    """iq1_find_best_neighbour2 for keys off the codebook: the neighbour minimizing sum w * (scale * v - x)^2, v its
    shifted levels (``shifted`` (n, 3): the group's delta row), summed in coordinate order in float32, the first on
    a tie. Groups go by their count of neighbours, so a chunk is as wide as its longest list. -> entries (n,)."""
    table = _table()
    count, columns = _neighbour_slots()
    slot = table.slot[keys]
    out = np.empty(len(keys), np.int32)
    by_count = np.argsort(count[slot], kind="stable")
    for s in range(0, len(keys), NEAREST_CHUNK):
        part = by_count[s:s + NEAREST_CHUNK]
        width = int(count[slot[part]].max())
        cost = _costs(x[part], w[part], scale[part], shifted[part])
        at = columns[slot[part], :, :width] + (COST_ROW * np.arange(len(part)))[:, None, None]
        d2 = np.take(cost, at[:, 0])
        for i in range(1, at.shape[1]):
            d2 += np.take(cost, at[:, i])
        out[part] = table.neighbours[slot[part], np.argmin(d2, axis=1)]
    return out


def _points(xb: np.ndarray, w: np.ndarray, levels: np.ndarray, scale: np.ndarray,
            minus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each group's codebook entry: its own where its levels are on the codebook, else the best neighbour at
    ``scale`` under its delta sign (``minus`` (n, groups)); and the scale refitted to the entries' shifted levels
    where any group left the codebook (and the fit is positive). -> (entries (n, groups) int32, scale (n,))."""
    table = _table()
    n, size = xb.shape
    groups = size // GROUP
    keys = table.key(levels.reshape(n, groups, GROUP))
    entries = table.index[keys]
    off = entries < 0
    block, group = np.nonzero(off)
    if len(block):
        entries[block, group] = _nearest(keys[block, group], xb.reshape(n, groups, GROUP)[block, group],
                                         w.reshape(n, groups, GROUP)[block, group], scale[block],
                                         SHIFTED[minus[block, group].astype(np.intp)])
    v = _shifted_values(entries, minus)
    sumqx, sumq2 = _fit(xb, w, v)
    refit = off.any(axis=1) & (sumqx > 0) & (sumq2 > 0)
    return entries, np.where(refit, sumqx / np.where(refit, sumq2, F(1)), scale).astype(F)


def _fit(x: np.ndarray, w: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum w * v * x and sum w * v * v along rows (n, size), in element order."""
    sumqx = np.zeros(len(x), F)
    sumq2 = np.zeros(len(x), F)
    for j in range(x.shape[1]):
        wv = w[:, j] * v[:, j]
        sumqx = sumqx + wv * x[:, j]
        sumq2 = sumq2 + wv * v[:, j]
    return sumqx, sumq2


def _shifted_values(entries: np.ndarray, minus: np.ndarray) -> np.ndarray:
    """The shifted level of each weight of entries (n, groups) under delta signs (n, groups) -> (n, groups * 8)."""
    lv = ((_table().points[entries] - 1) // 2).astype(np.intp)
    return SHIFTED[minus.astype(np.intp)[..., None], lv].reshape(len(entries), -1)


def _codes(entries: np.ndarray, minus: np.ndarray) -> np.ndarray:
    """8 * g +- 1 for each weight of entries (n, groups) under delta signs (n, groups) -> (n, groups * 8) int8."""
    g = (_table().points[entries].astype(np.int8) - 1) // 2 - 1
    return (8 * g + np.where(minus, -1, 1).astype(np.int8)[..., None]).astype(np.int8).reshape(len(entries), -1)


def _super_scale(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per super-block (rows of block scales): whether any is nonzero, d = max / 15 (1 where none is) and each
    block's 3-bit l = nearest_int((scale / d - 1) / 2) clamped to 0..7 (0 where none is)."""
    top = scales.max(axis=1)
    live = top != 0
    d = np.where(live, top / F(15), F(1)).astype(F)
    l = np.clip(nearest_int(F(0.5) * ((F(1) / d)[:, None] * scales - F(1))), 0, 7)
    return live, d, np.where(live[:, None], l, 0)


def _weights(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """llama.cpp's weights for blocks (n, block): qw * sqrt(sigma2 + x^2), sigma2 = 2 * mean x^2 over the
    super-block, or x^2 without an importance."""
    if importance is None:
        return x * x
    return importance_weights(x, np.asarray(importance, F), SUPER, 2.0)


class IQ1Grid(LatticeGrid):
    """What IQ1_S and IQ1_M share: codes 8 * g +- 1, so value = d * code with d = fp16(d) * (2l + 1) / 8."""

    bits = 1
    qmin, qmax = -9, 9
    needs_importance = True
    kernel = lazy("quantfab.kernels.iq1_search")  # search_reference as a kernel (C on the CPU, CUDA on a GPU)
    eps: np.float32  # a block whose largest |x| is below stays at scale 0 (entries 0, +delta)

    def search_reference(self, x: np.ndarray,
                         importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``search`` in NumPy: the kernel's specification, and what the numpy backend runs."""
        raise NotImplementedError

    def _blocks(self, x: np.ndarray) -> np.ndarray:
        """Rows (rows, cols), checked, -> blocks (n, block) float32."""
        return x.reshape(-1, self.block)

    def _search_blocks(self, xb: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every block (n, block) -> (entries (n, groups) int32, scale (n,), delta sign per group (n, groups))."""
        n = len(xb)
        groups = self.block // GROUP
        entries = np.zeros((n, groups), np.int32)
        scales = np.zeros(n, F)
        minus = np.zeros((n, groups), bool)
        todo = np.nonzero(np.abs(xb).max(axis=1) >= self.eps)[0]
        for s in range(0, len(todo), CHUNK):
            at = todo[s:s + CHUNK]
            xc, wc = xb[at], w[at]
            order, rank = _sort(xc)
            levels, scale, sign, found = self._best_split(np.take_along_axis(xc, order, 1),
                                                          np.take_along_axis(wc, order, 1), order, rank)
            flip = scale < 0
            levels = np.where(flip[:, None], 2 - levels, levels).astype(np.int8)
            sign = np.where(flip[:, None], ~sign, sign)  # a negative scale: mirror the levels and the deltas
            e, sc = _points(xc, wc, levels, np.abs(scale), sign)
            entries[at] = np.where(found[:, None], e, 0)
            scales[at] = np.where(found, sc, F(0))
            minus[at] = sign & found[:, None]
        return entries, scales, minus

    def _best_split(self, xs: np.ndarray, ws: np.ndarray, order: np.ndarray,
                    rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Sorted blocks -> (levels (n, block), signed scale (n,), delta signs (n, groups), whether any won)."""
        raise NotImplementedError


class IQ1SGrid(IQ1Grid):
    """IQ1_S: 32-weight blocks, each with a 3-bit scale and one delta sign."""

    name = "IQ1_S"
    asserts_importance = True
    block = 32
    type_size = 50
    eps = F(1e-12)  # GROUP_MAX_EPS_IQ1_S

    def _best_split(self, xs: np.ndarray, ws: np.ndarray, order: np.ndarray,
                    rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every split (i1, i2) of the sorted block, +delta then -delta: the sums split into the part below i1
        (level -1), to i2 (level 0) and the rest (level 1); the first and last parts are tabulated per split point."""
        sumx, sumw = _prefix((ws * xs).T), _prefix(ws.T)  # from +0, so less the sum at 0 is the sum itself
        top_x, top_w = sumx[-1] - sumx, sumw[-1] - sumw
        low_x = [sumx * v[0] for v in SHIFTED]  # per sign: (i1, n)
        low_w = [sumw * v[0] * v[0] for v in SHIFTED]
        high_x = [top_x * v[2] for v in SHIFTED]  # per sign: (i2, n)
        high_w = [top_w * v[2] * v[2] for v in SHIFTED]
        scan = _Scan(len(xs))
        for i1 in range(self.block + 1):
            mid_x, mid_w = sumx[i1:] - sumx[i1], sumw[i1:] - sumw[i1]
            qx = [low_x[s][i1] + mid_x * v[1] + high_x[s][i1:] for s, v in enumerate(SHIFTED)]
            q2 = [low_w[s][i1] + mid_w * v[1] * v[1] + high_w[s][i1:] for s, v in enumerate(SHIFTED)]
            scan.offer(qx, q2)
        levels, sign = _split(rank, scan.win, self.block, 2)
        return levels, scan.scale, np.repeat((sign == 1)[:, None], self.block // GROUP, axis=1), scan.win >= 0

    def search_reference(self, x: np.ndarray,
                         importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, importance = self.checked(x, importance)
        rows, cols = x.shape
        xb = self._blocks(x)
        entries, scales, minus = self._search_blocks(xb, _weights(xb, importance))
        per = SUPER // self.block
        live, d, l = _super_scale(scales.reshape(-1, per))
        sign = minus[:, 0].reshape(-1, per) & live[:, None]  # the delta signs are written with the scales
        stored = np.where(live, _fp16(d * F(1.125)), F(0)).astype("<f2")
        high = (entries.astype(np.uint16) >> 8) << (3 * np.arange(self.block // GROUP, dtype=np.uint16))
        qh = (high.sum(axis=1, dtype=np.uint16).reshape(-1, per) | (l.astype(np.uint16) << 12)
              | (sign.astype(np.uint16) << 15))
        blocks = np.concatenate([stored[:, None].view(np.uint8), (entries & 255).astype(np.uint8).reshape(-1, 32),
                                 qh.astype("<u2").view(np.uint8)], axis=1)
        scale = stored.astype(F)[:, None] * (2 * l + 1).astype(F) / F(8)
        codes = _codes(entries, np.repeat(sign.reshape(-1, 1), self.block // GROUP, axis=1))
        return codes.reshape(rows, cols), scale.reshape(rows, -1), blocks.reshape(rows, -1)

    def codes_of(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        stored = stored_d(blocks)
        qh = blocks[:, 34:].copy().view("<u2").astype(np.int32)  # (n, 8): high bits, l << 12, sign << 15
        entries = blocks[:, 2:34].astype(np.int32).reshape(-1, 8, 4) | (
            ((qh[:, :, None] >> (3 * np.arange(4))) & 7) << 8)
        l = (qh >> 12) & 7
        scale = stored.astype(F)[:, None] * (2 * l + 1).astype(F) / F(8)
        codes = _codes(entries.reshape(-1, 4), np.repeat((qh >> 15).astype(bool).reshape(-1, 1), 4, axis=1))
        return codes.reshape(len(blocks), -1), scale.reshape(-1)


class IQ1MGrid(IQ1Grid):
    """IQ1_M: 16-weight blocks, each with a 3-bit scale, and a delta sign per group of 8."""

    name = "IQ1_M"
    block = 16
    type_size = 56
    eps = F(1e-7)  # GROUP_MAX_EPS_IQ1_M

    def _best_split(self, xs: np.ndarray, ws: np.ndarray, order: np.ndarray,
                    rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every split (i1, i2) of the sorted block under each pair of delta signs of the two halves (++, +-, -+,
        --), from prefix sums kept per half; with steps of -1 between levels a half's sum is its total times the top
        level less the prefix sums at i1 and at i2."""
        (xp0, xp1, p2), (xm0, xm1, m2) = SHIFTED
        lower = [xp0 * xp0 - xp1 * xp1, xm0 * xm0 - xm1 * xm1]  # the q^2 steps at i1 and at i2, per sign
        upper = [xp1 * xp1 - p2 * p2, xm1 * xm1 - m2 * m2]
        wx = (ws * xs).T
        second = (order >= self.block // 2).T
        half_x = [_prefix(wx, ~second), _prefix(wx, second)]
        half_w = [_prefix(ws.T, ~second), _prefix(ws.T, second)]
        scan = _Scan(len(xs))
        for i1 in range(self.block + 1):
            qx, q2 = [], []  # per half, then sign: (i2, n)
            for px, pw in zip(half_x, half_w):
                sx = px[i1] + px[i1:]
                qx.append([px[-1] * top - sx for top in (p2, m2)])
                q2.append([(pw[-1] * top * top + pw[i1] * lo) + pw[i1:] * up
                           for top, lo, up in zip((p2, m2), lower, upper)])
            scan.offer([qx[0][a] + qx[1][b] for a in range(2) for b in range(2)],
                       [q2[0][a] + q2[1][b] for a in range(2) for b in range(2)])
        levels, k = _split(rank, scan.win, self.block, 4)
        return levels, scan.scale, np.stack([k >= 2, k % 2 == 1], axis=1), scan.win >= 0

    def search_reference(self, x: np.ndarray,
                         importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, importance = self.checked(x, importance)
        rows, cols = x.shape
        xb = self._blocks(x)
        w = _weights(xb, importance)
        entries, scales, minus = self._search_blocks(xb, w)
        per = SUPER // self.block
        live, d, l = _super_scale(scales.reshape(-1, per))
        minus = minus & np.repeat(live, per)[:, None]  # the delta signs are written with the scales
        d = self._refit(xb, w, entries, minus, l, d)
        bits = np.where(live, _fp16(d * F(1.1125)), F(0)).astype("<f2").view(np.uint16)
        sc = (l.astype(np.uint16).reshape(-1, 4, 4) << (3 * np.arange(4, dtype=np.uint16))).sum(axis=2,
                                                                                                dtype=np.uint16)
        sc |= ((bits[:, None] >> (4 * np.arange(4, dtype=np.uint16))) & 15) << 12
        qh = ((entries >> 8) << np.array([0, 4])).sum(axis=1) | (minus.astype(np.int32) << np.array([3, 7])).sum(1)
        blocks = np.concatenate([(entries & 255).astype(np.uint8).reshape(-1, 32), qh.astype(np.uint8).reshape(-1, per),
                                 sc.astype("<u2").view(np.uint8)], axis=1)
        scale = bits.view("<f2").astype(F)[:, None] * (2 * l + 1).astype(F) / F(8)
        codes = _codes(entries, minus)
        return codes.reshape(rows, cols), scale.reshape(rows, -1), blocks.reshape(rows, -1)

    def codes_of(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        qh = blocks[:, 32:48].astype(np.int32)[:, :, None]  # per block: high bits, delta signs at bits 3 and 7
        sc = blocks[:, 48:].copy().view("<u2").astype(np.int32)  # four 3-bit l each, a nibble of the fp16 on top
        entries = blocks[:, :32].astype(np.int32).reshape(-1, 16, 2) | (((qh >> np.array([0, 4])) & 7) << 8)
        minus = ((qh >> np.array([3, 7])) & 1).astype(bool)
        l = ((sc[:, :, None] >> (3 * np.arange(4))) & 7).reshape(-1, 16)
        bits = ((sc >> 12) << (4 * np.arange(4))).sum(axis=1).astype(np.uint16)
        scale = bits.view("<f2").astype(F)[:, None] * (2 * l + 1).astype(F) / F(8)
        return _codes(entries.reshape(-1, 2), minus.reshape(-1, 2)).reshape(len(blocks), -1), scale.reshape(-1)

    def _refit(self, xb: np.ndarray, w: np.ndarray, entries: np.ndarray, minus: np.ndarray, l: np.ndarray,
               d: np.ndarray) -> np.ndarray:
        """The super-block d fitted to the stored points times 2l + 1 over all its weights, blocks left at scale 0
        included (as entry 0 under +delta), where the fit's sum of q^2 is positive; max / 15 elsewhere."""
        v = _shifted_values(entries, minus) * (2 * l + 1).astype(F).reshape(-1, 1)
        sumqx, sumq2 = _fit(xb.reshape(-1, SUPER), w.reshape(-1, SUPER), v.reshape(-1, SUPER))
        return np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F(1)), d).astype(F)


IQ1_GRIDS: tuple[LatticeGrid, ...] = (IQ1SGrid(), IQ1MGrid())
