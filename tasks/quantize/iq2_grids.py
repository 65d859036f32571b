"""llama.cpp's 2-bit lattice types: each group of 8 weights is one point of an E8-like codebook (coordinates on the
levels 1, 3, 5, 7 of the search, stored as 8, 25, 43 by the reader) plus its signs; a sub-block shares a 4-bit scale
l, worth d * (0.5 + l) / 4 of the fp16 super-block d.

IQ2_XXS: 256 codebook points, one byte each, 7 sign bits per group (the eighth makes the count of negatives even) and
one scale per 32 weights (66 bytes per 256: 2.06 bits per weight);
IQ2_XS: 512 points, 9 bits each, 7 sign bits per group, one scale per 16 weights (74 bytes: 2.31 bits per weight);
IQ2_S: 1024 points, 10 bits each, a whole sign byte per group, one scale per 16 weights (82 bytes: 2.56 bits).

``search`` is llama.cpp's quantize_iq2_xxs / quantize_iq2_xs / quantize_iq2_s (quantize_row_iq2_*_impl), ported op
for op in float32 over all blocks of all rows at once. The three run one search: the signs are taken out first,
then a few trial scales round the magnitudes to levels, a key off the codebook goes to its best neighbour, the scale
fitted by weighted least squares to the best trial's points is kept, and some of its groups are rounded again at
that scale. What differs per type is a handful of class attributes and overrides on ``IQ2Grid``. ``search`` runs it as a
kernel (kernels/iq2_search.cu: C on every core, CUDA on a GPU) and ``search_reference`` in NumPy, the kernel's
specification; both decode the codes and scales from the bytes.
"""

from __future__ import annotations

import gguf.quants
import numpy as np

from quantfab.tasks.lazy import lazy
from quantfab.tasks.quantize.kquants import (GROUP_MAX_EPS, _columns, _fp16, importance_weights, nearest_int,
                                             row_sums_of_squares, search_positive_scale_reference)
from quantfab.tasks.quantize.lattice import LatticeGrid, LatticeTable, lattice_table, stored_d, with_parity_sign


F = np.float32
SUPER = 256
GROUP = 8  # weights per codebook point
TOP_LEVEL = 2  # the rounding clamps levels to 0..2: level 3 comes only from a neighbour
SEVEN_BITS = np.uint8(127)  # the stored signs of IQ2_XXS / IQ2_XS: the eighth follows from their parity


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den where den > 0, else 0 (never divides by zero)."""
    return np.where(den > 0, num / np.where(den > 0, den, F(1)), F(0)).astype(F)


def low_and_high_nibbles(scales: np.ndarray) -> np.ndarray:
    """Bytes of two 4-bit scales (s, n) -> the scales in order (s, 2 n)."""
    return np.stack([scales & 15, scales >> 4], axis=-1).reshape(len(scales), -1)


def fold_signs(x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (n, block) -> magnitudes to search and each group's sign byte (n, groups), bit i set where weight i is
    stored negative. Only 7 bits are stored, so a group must have an even count of negatives: where it is odd, the
    weight of least weight * x^2 (the first on a tie) keeps its sign, its magnitude going into the search negative."""
    n = len(x)
    negative = (~(x >= 0)).reshape(n, -1, GROUP)
    xval = np.where(x >= 0, x, -x).astype(F).reshape(n, -1, GROUP)
    odd = negative.sum(axis=-1) % 2 == 1
    cost = (weight * x * x).reshape(n, -1, GROUP)
    flip = (np.arange(GROUP) == cost.argmin(axis=-1)[..., None]) & odd[..., None]
    xval = np.where(flip, -xval, xval)
    bits = (negative ^ flip).astype(np.uint8) << np.arange(GROUP, dtype=np.uint8)
    return xval.reshape(x.shape), bits.sum(axis=-1, dtype=np.uint8)


def assign(table: LatticeTable, xc: np.ndarray, wac: np.ndarray, inverse: np.ndarray,
           scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each group's codebook entry at one trial, for blocks as columns (block, n): levels rounded against
    ``inverse`` (n,), clamped to 0..2, give their own entry where the key is on the codebook, else the neighbour best
    at ``scale`` under weights ``wac`` (square roots of the fits' weights). -> (entries (groups, n) int32, whether
    the rounded key was on the codebook (groups, n)). Columns keep a group's 8 levels a whole row apart, so its key
    is summed over rows of n (fast in NumPy, where a sum over 8 adjacent values is not), and a group at a time keeps
    the temporaries small enough for malloc to reuse rather than map afresh."""
    groups, n = len(xc) // GROUP, xc.shape[1]
    keys = np.empty((groups, n), np.int64)
    for g, part in enumerate(xc.reshape(groups, GROUP, n)):
        levels = np.clip(nearest_int(F(0.5) * (inverse * part - F(1))), 0, TOP_LEVEL).astype(np.int8)
        keys[g] = table.key(levels.T)
    entries = table.index[keys]
    on = entries >= 0
    group, block = np.nonzero(~on)
    if len(group):
        rows = group * GROUP * n + block + n * np.arange(GROUP)[:, None]  # (8, off): each coordinate's flat index
        xg, wg = xc.reshape(-1)[rows].T, wac.reshape(-1)[rows].T  # (off, 8), each coordinate contiguous
        entries[group, block] = table.nearest(keys[group, block], xg, wg, scale[block])
    return entries, on


def fit(table: LatticeTable, xc: np.ndarray, wc: np.ndarray, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum w*x*q and sum w*q*q in element order, q the points' coordinates; xc, wc columns (block, n), entries
    (groups, n)."""
    coords = table.points.T.astype(F)  # (8, codebook entries)
    sumqx = np.zeros(xc.shape[1], F)
    sumq2 = np.zeros(xc.shape[1], F)
    for g, group in enumerate(entries):
        q = np.take(coords, group, axis=1)  # (8, n): the group's points, coordinate by coordinate
        for j in range(GROUP):
            i = g * GROUP + j
            sumqx = sumqx + wc[i] * xc[i] * q[j]
            sumq2 = sumq2 + wc[i] * q[j] * q[j]
    return sumqx, sumq2


def trial_steps(table: LatticeTable, xc: np.ndarray, wc: np.ndarray, wac: np.ndarray, reach: np.ndarray,
                steps: range, scale: np.ndarray, entries: np.ndarray,
                on: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trial loop over blocks as columns (block, n) of magnitudes, weights and their square roots: levels at
    inverse scales (5 + 0.1 step) / reach, each block keeping the trial whose fitted scale explains most
    (sumqx^2 / sumq2, strictly better than the last kept, from 0): its scale, entries and which of its groups rounded
    onto the codebook (groups, n); blocks no trial improves keep ``scale``, ``entries``, ``on``."""
    best = np.zeros(xc.shape[1], F)
    for step in steps:
        inverse = ((F(5) + F(step) * F(0.1)) / reach).astype(F)
        got, got_on = assign(table, xc, wac, inverse, (F(1) / inverse).astype(F))
        sumqx, sumq2 = fit(table, xc, wc, got)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = np.where(better, _ratio(sumqx, sumq2), scale).astype(F)
        best = np.where(better, scale * sumqx, best).astype(F)
        entries = np.where(better, got, entries)
        on = np.where(better, got_on, on)
    return scale, entries, on


def refit(table: LatticeTable, xc: np.ndarray, wc: np.ndarray, wac: np.ndarray, scale: np.ndarray,
          entries: np.ndarray, redo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The last pass, on columns as ``trial_steps``: groups marked ``redo`` (groups, n) re-rounded at their block's
    ``scale`` itself, then the scale of every block with a group redone refitted to its points where sumq2 > 0."""
    entries = entries.copy()
    for g, marked in enumerate(redo):
        cols = np.nonzero(marked)[0]
        rows = slice(g * GROUP, (g + 1) * GROUP)
        s = scale[cols]
        got, _ = assign(table, np.take(xc[rows], cols, axis=1), np.take(wac[rows], cols, axis=1),
                        (F(1) / s).astype(F), s)
        entries[g, cols] = got[0]
    blocks = np.nonzero(redo.any(axis=0))[0]
    sumqx, sumq2 = fit(table, np.take(xc, blocks, axis=1), np.take(wc, blocks, axis=1), entries[:, blocks])
    scale = scale.copy()
    scale[blocks] = np.where(sumq2 > 0, _ratio(sumqx, sumq2), scale[blocks])
    return scale, entries


class IQ2Grid(LatticeGrid):
    """The search the 2-bit lattice types share, with IQ2_XS's choices as defaults; a subclass names its codebook,
    block and trials, overrides what its llama.cpp function does differently, and packs its bytes."""

    bits, qmin, qmax = 2, -43, 43
    needs_importance = True  # llama.cpp's tensor_requires_imatrix holds for all three
    asserts_importance = True  # quantize_iq2_xxs / quantize_iq2_xs assert quant_weights
    kernel = lazy("quantfab.kernels.iq2_search")  # search_reference as a kernel (it imports this module)
    codebook: type  # gguf-py's quant class, whose grid holds the reader's values (8, 25, 43)
    nwant: int  # distinct distances in each neighbour list of a key off the codebook
    trials: int  # trial scales (5 + t / 10) / reach for t in -trials..trials
    sigma2_factor = 1.0  # the weights qw * sqrt(sigma2 + x^2) take sigma2 = factor * (sum of x^2) / 256
    group_max_eps = GROUP_MAX_EPS  # a block whose magnitudes all fall below it stays zero
    refit_every_group = False  # the last pass re-rounds every group, not only those the best trial moved on
    clears_empty_super_blocks = True  # a super-block whose scales are all 0 stores zero entries and signs
    d_factor = F(1)  # the stored super-block scale is fp16(d_factor * largest scale / 31)

    @property
    def table(self) -> LatticeTable:
        return lattice_table(self.codebook, 2, self.nwant)

    def weigh(self, xb: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        """Each weight's importance in the fits, blocks (n, block) -> (n, block)."""
        return importance_weights(xb, importance, SUPER, self.sigma2_factor)

    def split_signs(self, xb: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Blocks (n, block) -> (magnitudes to search, each group's sign byte (n, groups)): signs folded so that
        7 stored bits and their parity say them all."""
        return fold_signs(xb, weight)

    def start(self, xval: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The scale a block keeps if no trial improves on it, and the reach its trial scales are taken about:
        the largest magnitude, with a fifth of it to start (kMaxQ = 3: 2 * kMaxQ - 1 = 5)."""
        top = xval.max(axis=1)
        return (top / F(5)).astype(F), top

    def search_blocks(self, xval: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per block: (scale float32 (n,), possibly negative; entries (n, groups); whether the block's fields are
        written (n,), not left as zeros)."""
        table = self.table
        n = len(xval)
        scale = np.zeros(n, F)
        entries = np.zeros((n, self.block // GROUP), np.int32)
        live = np.nonzero(xval.max(axis=1) >= self.group_max_eps)[0]
        start, reach = self.start(xval[live], weight[live])
        live, start, reach = live[reach > 0], start[reach > 0], reach[reach > 0]
        xc, wc = _columns(xval[live]), _columns(weight[live])
        wac = np.sqrt(wc)
        first = np.full((self.block // GROUP, len(live)), table.index[0], np.int32)  # levels 0, the first point
        steps = range(-self.trials, self.trials + 1)
        s, got, on = trial_steps(table, xc, wc, wac, reach, steps, start, first, np.ones(first.shape, bool))
        s, got = refit(table, xc, wc, wac, s, got, (s > 0) & (~on | self.refit_every_group))
        scale[live], entries[live] = s, got.T
        written = np.zeros(n, bool)
        written[live] = True
        return scale, entries, written

    def pack(self, d: np.ndarray, levels: np.ndarray, entries: np.ndarray, signs: np.ndarray) -> np.ndarray:
        """ggml bytes of super-blocks: fp16 d (s,), 4-bit scales (s, sub-blocks), entries and sign bytes (s, groups)."""
        raise NotImplementedError

    def unpack(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``pack`` undone, super-blocks (s, type_size) -> (fp16 d as float32 (s,), 4-bit scales (s, sub-blocks),
        entries and sign bytes, all 8 signs, (s, groups))."""
        raise NotImplementedError

    def search_reference(self, x: np.ndarray,
                         importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The search in NumPy, the kernel's specification: as ``search``."""
        x, importance = self.checked(x, importance)
        with np.errstate(over="ignore", invalid="ignore"):  # float32 overflows to inf, as in llama.cpp's C
            blocks = self._search(x, importance)
        return self.decoded(blocks, x.shape)

    def codes_of(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each weight's signed codebook value and each block's effective scale fp16(d) * (0.5 + l) / 4."""
        stored, levels, entries, signs = self.unpack(raw)
        effective = np.repeat(stored, SUPER // self.block) * (F(0.5) + levels.reshape(-1).astype(F)) * F(0.25)
        values = self.table.values[entries]
        negative = ((signs[..., None] >> np.arange(GROUP, dtype=np.uint8)) & 1) == 1
        return np.where(negative, -values, values).reshape(-1), effective.astype(F)

    def _search(self, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        rows = len(x)
        xb = x.reshape(-1, self.block)
        weight = self.weigh(xb, importance)
        xval, signs = self.split_signs(xb, weight)
        scale, entries, written = self.search_blocks(xval, weight)
        signs = np.where((scale < 0)[:, None], ~signs, signs).astype(np.uint8)
        scale = np.where(scale < 0, -scale, scale).astype(F)  # a positive scale: the flipped signs carry the sign
        per = SUPER // self.block
        top = scale.reshape(-1, per).max(axis=1)
        kept = np.repeat(top != 0, per)  # a super-block whose scales are all 0 has d = 0 and scales 0
        if self.clears_empty_super_blocks:
            written &= kept
        entries = np.where(written[:, None], entries, 0)
        signs = np.where(written[:, None], signs, 0).astype(np.uint8)
        d = (top / F(31)).astype(F)
        stored = _fp16(d * self.d_factor)
        inverse = (F(1) / np.where(top != 0, d, F(1))).astype(F)
        levels = np.clip(nearest_int(F(0.5) * (np.repeat(inverse, per) * scale - F(1))), 0, 15)
        levels = np.where(kept, levels, 0).reshape(-1, per)
        groups = SUPER // GROUP
        return self.pack(stored, levels, entries.reshape(-1, groups), signs.reshape(-1, groups)).reshape(rows, -1)


class IQ2XXSGrid(IQ2Grid):
    """IQ2_XXS: one byte per codebook point (256), 4 x 7 sign bits and the 4-bit scale per 32 weights."""

    name, block, type_size = "IQ2_XXS", 32, 66
    codebook = gguf.quants.IQ2_XXS
    nwant, trials = 2, 6
    refit_every_group = True

    def start(self, xval: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """make_qp_quants' scale for levels 0..4 of the magnitudes, its reach 3 * scale (eff_max, kMaxQ = 3); a block
        whose reach is not positive stays zero."""
        scale, _ = search_positive_scale_reference(xval, weight, 4)
        return scale, (scale * F(3)).astype(F)

    def pack(self, d: np.ndarray, levels: np.ndarray, entries: np.ndarray, signs: np.ndarray) -> np.ndarray:
        sub = entries.reshape(len(d), -1, 4).astype(np.uint32)
        indices = (sub << np.array([0, 8, 16, 24], np.uint32)).sum(axis=-1, dtype=np.uint32)
        seven = (signs & SEVEN_BITS).reshape(len(d), -1, 4).astype(np.uint32)
        bits = seven << np.array([0, 7, 14, 21], np.uint32)
        upper = bits.sum(axis=-1, dtype=np.uint32) | (levels.astype(np.uint32) << 28)
        qs = np.stack([indices, upper], axis=-1).reshape(len(d), -1).astype("<u4")
        return np.concatenate([d.astype("<f2").view(np.uint8).reshape(-1, 2), qs.view(np.uint8)], axis=1)

    def unpack(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        qs = np.ascontiguousarray(blocks[:, 2:]).view("<u4").reshape(len(blocks), -1, 2)
        entries = ((qs[..., :1] >> np.array([0, 8, 16, 24], np.uint32)) & 255).reshape(len(blocks), -1)
        seven = ((qs[..., 1:] >> np.array([0, 7, 14, 21], np.uint32)) & 127).reshape(len(blocks), -1)
        return (stored_d(blocks), (qs[..., 1] >> 28).astype(np.int32), entries.astype(np.int32),
                with_parity_sign(seven.astype(np.uint8)))


class IQ2XSGrid(IQ2Grid):
    """IQ2_XS: 9 bits of codebook point (512) and 7 sign bits per group, a 4-bit scale per 16 weights."""

    name, block, type_size = "IQ2_XS", 16, 74
    codebook = gguf.quants.IQ2_XS
    nwant, trials = 2, 9

    def pack(self, d: np.ndarray, levels: np.ndarray, entries: np.ndarray, signs: np.ndarray) -> np.ndarray:
        qs = (entries.astype(np.uint16) | ((signs & SEVEN_BITS).astype(np.uint16) << 9)).astype("<u2")
        scales = (levels[:, 0::2] | (levels[:, 1::2] << 4)).astype(np.uint8)
        return np.concatenate([d.astype("<f2").view(np.uint8).reshape(-1, 2), qs.view(np.uint8), scales], axis=1)

    def unpack(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        qs = np.ascontiguousarray(blocks[:, 2:66]).view("<u2")
        levels = low_and_high_nibbles(blocks[:, 66:]).astype(np.int32)
        return stored_d(blocks), levels, (qs & 511).astype(np.int32), with_parity_sign((qs >> 9).astype(np.uint8))


class IQ2SGrid(IQ2Grid):
    """IQ2_S: 10 bits of codebook point (1024) and a sign byte per group, a 4-bit scale per 16 weights. llama.cpp
    writes a sub-block's fields as it goes, so a super-block whose scales all come out 0 keeps them, and it stores
    the super-block scale a little low (0.9875)."""

    name, block, type_size = "IQ2_S", 16, 82
    codebook = gguf.quants.IQ2_S
    nwant, trials = 1, 9
    sigma2_factor = 2.0
    group_max_eps = F(1e-8)  # GROUP_MAX_EPS_IQ2_S
    clears_empty_super_blocks = False
    d_factor = F(0.9875)
    asserts_importance = False

    def weigh(self, xb: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        """Without an importance, quantize_row_iq2_s_impl weighs by 0.25 * sigma2 + x^2 (it runs without one)."""
        if importance is not None:
            return super().weigh(xb, importance)
        sigma2 = F(self.sigma2_factor) * row_sums_of_squares(xb.reshape(-1, SUPER)) / F(SUPER)
        return (F(0.25) * np.repeat(sigma2, SUPER // self.block)[:, None] + xb * xb).astype(F)

    def split_signs(self, xb: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every sign is stored, so the search takes the plain magnitudes."""
        negative = ~(xb >= 0)
        signs = np.packbits(negative.reshape(len(xb), -1, GROUP), axis=-1, bitorder="little")[..., 0]
        return np.where(negative, -xb, xb).astype(F), signs

    def pack(self, d: np.ndarray, levels: np.ndarray, entries: np.ndarray, signs: np.ndarray) -> np.ndarray:
        high = ((entries >> 8).reshape(len(d), -1, 4) << (2 * np.arange(4))).sum(axis=-1).astype(np.uint8)
        scales = (levels[:, 0::2] | (levels[:, 1::2] << 4)).astype(np.uint8)
        return np.concatenate([d.astype("<f2").view(np.uint8).reshape(-1, 2), (entries & 0xFF).astype(np.uint8),
                               signs, high, scales], axis=1)

    def unpack(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        high = (blocks[:, 66:74, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3
        entries = blocks[:, 2:34].astype(np.int32) | (high.reshape(len(blocks), -1).astype(np.int32) << 8)
        levels = low_and_high_nibbles(blocks[:, 74:]).astype(np.int32)
        return stored_d(blocks), levels, entries, blocks[:, 34:66].copy()


IQ2_GRIDS: tuple[LatticeGrid, ...] = (IQ2XXSGrid(), IQ2XSGrid(), IQ2SGrid())
