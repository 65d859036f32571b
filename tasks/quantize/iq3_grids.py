"""llama.cpp's 3-bit lattice types: each group of 4 weights is one point of a codebook whose coordinates take 8
levels, plus a sign per weight, under a 4-bit scale per block of 32 and an fp16 scale per super-block of 256.

IQ3_XXS (98 bytes per 256, 3.06 bits per weight) has 256 points, so an index is a byte, and stores 7 signs per 8
weights (the 8th makes their count even, so the search flips the cheapest weight of a group with an odd count);
IQ3_S (110 bytes, 3.44 bits) has 512 points (a 9th index bit in ``qh``) and all 8 signs.

``search_reference`` is llama.cpp's quantize_iq3_xxs / quantize_iq3_s (quantize_row_iq3_xxs_impl,
quantize_row_iq3_s_impl) ported op for op in float32, vectorized over every 32-block of every row: weights x * x, or
under an importance matrix qw * sqrt(sigma2 + x^2); a block's levels are searched at 2 * trials + 1 scales about its
maximum (31 for IQ3_XXS, 19 for IQ3_S), off-grid groups moved to their best neighbour (``LatticeTable.nearest``), and
where the best scale's levels left groups off the grid, those (IQ3_XXS) or all the block's (IQ3_S) searched again at
it. ``search`` runs the same search on the current kernel backend (kernels/iq3_search.py: C on every core, or CUDA)
and decodes the codes from the bytes written, so ``d * codes`` is gguf-py's dequantize even where llama.cpp's bytes
do not hold what its search found (see ``IQ3SGrid``).
"""

from __future__ import annotations

import gguf
import numpy as np

from quantfab.tasks.lazy import lazy
from quantfab.tasks.quantize.kquants import _fp16, importance_weights, nearest_int
from quantfab.tasks.quantize.lattice import LatticeGrid, LatticeTable, lattice_table, stored_d, with_parity_sign

F = np.float32
QK = 256  # weights of a super-block
BLOCK = 32  # weights under one 4-bit scale
GROUPS = BLOCK // 4  # codebook points per block
MAX_LEVEL = 7  # 3 level bits; a level l is the coordinate 2 * l + 1 in the search


def _bits(byte: np.ndarray) -> np.ndarray:
    """(...,) unsigned -> (..., 8) 0/1, lowest bit first."""
    return ((byte[..., None] >> np.arange(8, dtype=byte.dtype)) & 1).astype(np.int8)


class _IQ3Grid(LatticeGrid):
    """What IQ3_XXS and IQ3_S share: the search, up to the few choices the subclasses set."""

    bits, block = 3, BLOCK
    kernel = lazy("quantfab.kernels.iq3_search")  # search_reference as a kernel (C on the CPU, CUDA on a GPU)
    codebook: type
    nwant: int  # distinct neighbour distances iq3xs_init_impl keeps
    trials: int  # scales tried either side of the block maximum's
    parity: bool  # an even count of negative weights per 8 (7 stored sign bits)
    fudge: float  # the super-block scale is stored as fp16(max_scale / 31 * fudge)
    start_on_grid: bool  # what a block with no accepted trial counts as, for the final pass

    @property
    def table(self) -> LatticeTable:
        return lattice_table(self.codebook, 3, self.nwant)

    def skipped(self, top: np.ndarray) -> np.ndarray:
        """Blocks the search leaves all-zero (no indices, signs or scale written), from each block's maximum."""
        raise NotImplementedError

    def final_groups(self, off: np.ndarray) -> np.ndarray:
        """Groups searched again at a block's best scale, given those off the grid there (8, blocks)."""
        raise NotImplementedError

    def pack(self, index: np.ndarray, negative: np.ndarray, scale: np.ndarray, skip: np.ndarray) -> np.ndarray:
        """The ggml bytes from each block's point indices (blocks, 8), negative flags (blocks, 32), scale and skip
        (blocks,) -> (super-blocks, type_size) uint8."""
        raise NotImplementedError

    def search_reference(self, x: np.ndarray,
                         importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The NumPy search (what kernels/iq3_search.cu answers on the other backends): as ``search``."""
        x, importance = self.checked(x, importance)
        rows, cols = x.shape
        xb = x.reshape(-1, BLOCK)
        if importance is None:
            weight = np.ascontiguousarray((xb * xb).T)
        else:
            weight = np.ascontiguousarray(importance_weights(xb, np.asarray(importance, F), QK, 2.0).T)
        xc = np.ascontiguousarray(xb.T)  # (32, blocks): the element-order loops walk rows of these
        with np.errstate(over="ignore", invalid="ignore"):
            index, negative, scale, skip = self._search_blocks(xc, weight)
            raw = self.pack(index, negative, scale, skip)
        return self.decoded(raw.reshape(rows, -1), x.shape)

    def _signs(self, xc: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(|x| with the parity flip, negative flags): where a group of 8 has an odd count of negative weights,
        IQ3_XXS flips the sign of its weight of least weight * x^2 (the first on a tie), so its xval turns
        negative and the search pays for the flip."""
        negative = xc < 0
        xval = np.where(negative, -xc, xc)
        if self.parity:
            odd = negative.reshape(4, 8, -1).sum(axis=1) % 2 == 1
            cheapest = ((weight * xc) * xc).reshape(4, 8, -1).argmin(axis=1)
            flip = ((np.arange(8)[None, :, None] == cheapest[:, None, :]) & odd[:, None, :]).reshape(BLOCK, -1)
            xval = np.where(flip, -xval, xval)
            negative ^= flip
        return xval, negative

    def _snap(self, levels: np.ndarray, xg: np.ndarray, wg: np.ndarray, scale: np.ndarray,
              active: np.ndarray) -> np.ndarray:
        """Levels (32, blocks) -> (8, blocks) on-grid flags; each active off-grid group's levels are replaced in
        place by those of its best neighbour at ``scale`` (blocks,) for |x| ``xg`` under weights ``wg`` (both
        (8, blocks, 4), group-major so a group's 4 values sit together)."""
        table = self.table
        groups = levels.reshape(GROUPS, 4, -1)
        keys = table.key(groups.transpose(0, 2, 1))
        on = table.index[keys] >= 0
        move = ~on & active
        if move.any():
            group, block = np.nonzero(move)
            entries = table.nearest(keys[group, block], xg[group, block], wg[group, block], scale[block])
            groups[group, :, block] = (table.points[entries] - 1) // 2
        return on

    @staticmethod
    def _fit(weight: np.ndarray, xval: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """sum w * xval * q and sum w * q * q over a block, q = 2 * level + 1, in element order."""
        sumqx = np.zeros(xval.shape[1], F)
        sumq2 = np.zeros(xval.shape[1], F)
        for w, v, lv in zip(weight, xval, levels):
            q = (F(2) * lv + F(1)).astype(F)
            sumqx = sumqx + w * v * q
            sumq2 = sumq2 + w * q * q
        return sumqx, sumq2

    def _levels(self, xval: np.ndarray, inverse: np.ndarray) -> np.ndarray:
        """The level nearest each |x| at the inverse scale (blocks,): round((x / scale - 1) / 2) within 0..7."""
        return np.clip(nearest_int(F(0.5) * (inverse * xval - F(1))), 0, MAX_LEVEL).astype(np.int8)

    def _search_blocks(self, xc: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every block's (point indices (blocks, 8), negative flags (blocks, 32), scale, skipped) as the impl's
        per-block loop leaves them."""
        xval, negative = self._signs(xc, weight)
        xg = np.ascontiguousarray(xval.reshape(GROUPS, 4, -1).transpose(0, 2, 1))
        wg = np.ascontiguousarray(np.sqrt(weight).reshape(GROUPS, 4, -1).transpose(0, 2, 1))
        top = xval.max(axis=0)
        skip = self.skipped(top)
        top = np.where(skip, F(1), top)
        everywhere = np.ones((GROUPS, xc.shape[1]), bool)
        scale = top / F(15)
        best = np.zeros_like(scale)
        levels = np.zeros(xc.shape, np.int8)
        on_grid = np.full(everywhere.shape, self.start_on_grid)
        for step in range(-self.trials, self.trials + 1):
            inverse = (F(15) + F(step) * F(0.2)) / top
            trial = self._levels(xval, inverse)
            trial_on = self._snap(trial, xg, wg, F(1) / inverse, everywhere)
            sumqx, sumq2 = self._fit(weight, xval, trial)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            scale = np.where(better, sumqx / np.where(better, sumq2, F(1)), scale).astype(F)
            best = np.where(better, scale * sumqx, best).astype(F)
            levels = np.where(better, trial, levels)
            on_grid = np.where(better, trial_on, on_grid)
        redo = ~on_grid.all(axis=0) & (scale > 0) & ~skip
        if redo.any():
            again = self.final_groups(~on_grid) & redo
            trial = self._levels(xval, F(1) / np.where(redo, scale, F(1)))
            self._snap(trial, xg, wg, scale, again)
            levels = np.where(np.repeat(again, 4, axis=0), trial, levels)
            sumqx, sumq2 = self._fit(weight, xval, levels)
            fitted = redo & (sumq2 > 0)
            scale = np.where(fitted, sumqx / np.where(fitted, sumq2, F(1)), scale).astype(F)
        flipped = scale < 0  # llama.cpp's guard: a positive scale and every sign turned
        scale = np.where(flipped, -scale, scale)
        negative = negative ^ flipped
        scale = np.where(skip, F(0), scale).astype(F)
        index = self.table.index[self.table.key(levels.reshape(GROUPS, 4, -1).transpose(2, 0, 1))]
        if (index[~skip] < 0).any():
            raise AssertionError(f"{self.name}: a searched point is off the grid")
        return np.maximum(index, 0), np.ascontiguousarray(negative.T), scale, skip

    def _super_scales(self, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per super-block: (fp16 scale as stored, 4-bit block scales (super-blocks, 8), any nonzero scale)."""
        scales = scale.reshape(-1, QK // BLOCK)
        top = scales.max(axis=1)
        d = top / F(31)
        stored = _fp16(d * F(self.fudge))
        inverse = F(1) / np.where(top > 0, d, F(1))
        nibbles = np.clip(nearest_int(F(0.5) * (inverse[:, None] * scales - F(1))), 0, 15).astype(np.uint8)
        return np.where(top > 0, stored, F(0)).astype(F), nibbles, top > 0

    @staticmethod
    def _sign_bytes(negative: np.ndarray) -> np.ndarray:
        """Negative flags (blocks, 32) -> a byte per 8 weights (blocks, 4), first weight lowest."""
        return np.packbits(negative.reshape(-1, 4, 8), axis=2, bitorder="little")[..., 0]


class IQ3XXSGrid(_IQ3Grid):
    """IQ3_XXS: value = fp16(d) * (0.5 + s) * 0.5 * point * sign, s a 4-bit scale per 32. A block whose maximum
    is under 1e-8 is skipped: its zeroed bytes decode to point 0 at scale d / 4, not to zeros, as in llama.cpp."""

    name, qmin, qmax, type_size, needs_importance = "IQ3_XXS", -62, 62, 98, True
    codebook = gguf.quants.IQ3_XXS
    nwant, trials, parity, fudge, start_on_grid = 2, 15, True, 1.0125, True

    def skipped(self, top: np.ndarray) -> np.ndarray:
        return top < F(1e-8)

    def final_groups(self, off: np.ndarray) -> np.ndarray:
        return off

    def pack(self, index: np.ndarray, negative: np.ndarray, scale: np.ndarray, skip: np.ndarray) -> np.ndarray:
        stored, nibbles, live = self._super_scales(scale)
        low = (self._sign_bytes(negative) & 127).astype(np.uint32)
        words = low[:, 0] | (low[:, 1] << 7) | (low[:, 2] << 14) | (low[:, 3] << 21)
        words = np.where(skip, 0, words).reshape(-1, QK // BLOCK) | (nibbles.astype(np.uint32) << 28)
        points = np.where(skip[:, None], 0, index).astype(np.uint8).reshape(-1, QK // 4)
        body = np.concatenate([points, words.astype("<u4").view(np.uint8)], axis=1)
        body[~live] = 0
        return np.concatenate([stored.astype("<f2")[:, None].view(np.uint8), body], axis=1)

    def codes_of(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = stored_d(raw)
        words = raw[:, 2 + QK // 4:].copy().view("<u4").reshape(-1)
        scale = np.repeat(d, QK // BLOCK) * (F(0.5) + (words >> 28).astype(F)) * F(0.5)
        signs = with_parity_sign(((words[:, None] >> np.array([0, 7, 14, 21], np.uint32)) & 127).astype(np.uint8))
        points = self.table.values[raw[:, 2:2 + QK // 4].reshape(-1, GROUPS)].reshape(-1, BLOCK)
        return points * (1 - 2 * _bits(signs).reshape(-1, BLOCK)), scale


class IQ3SGrid(_IQ3Grid):
    """IQ3_S: value = fp16(d) * (1 + 2 * s) * point * sign. A block of zeros is skipped without moving llama.cpp's
    index and sign cursors, so the later blocks of its super-block store their indices and signs a block early
    (the 9th index bits stay in place) and the last slots stay zero; the bytes and codes here do the same."""

    name, qmin, qmax, type_size, needs_importance = "IQ3_S", -15, 15, 110, False
    codebook = gguf.quants.IQ3_S
    nwant, trials, parity, fudge, start_on_grid = 3, 9, False, 1.033, False

    def skipped(self, top: np.ndarray) -> np.ndarray:
        return top == 0

    def final_groups(self, off: np.ndarray) -> np.ndarray:
        return np.ones_like(off)

    def pack(self, index: np.ndarray, negative: np.ndarray, scale: np.ndarray, skip: np.ndarray) -> np.ndarray:
        stored, nibbles, live = self._super_scales(scale)
        kept = ~skip.reshape(-1, QK // BLOCK)
        slot = (np.cumsum(kept, axis=1) - 1 + np.arange(len(kept))[:, None] * (QK // BLOCK))[kept]
        low = np.zeros((len(skip), GROUPS), np.uint8)
        low[slot] = (index & 255)[~skip]
        signs = np.zeros((len(skip), 4), np.uint8)
        signs[slot] = self._sign_bytes(negative)[~skip]
        high = np.packbits(np.where(skip[:, None], 0, index >> 8).astype(np.uint8), axis=1, bitorder="little")
        scales = np.where(live[:, None], nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), 0).astype(np.uint8)
        return np.concatenate([stored.astype("<f2")[:, None].view(np.uint8), low.reshape(-1, QK // 4),
                               high.reshape(-1, QK // BLOCK), signs.reshape(-1, QK // 8), scales], axis=1)

    def codes_of(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = stored_d(raw)
        qs, qh, signs, packed = np.split(raw[:, 2:], np.cumsum([QK // 4, QK // 32, QK // 8]), axis=1)
        nibbles = np.stack([packed & 15, packed >> 4], axis=2).reshape(-1)
        scale = np.repeat(d, QK // BLOCK) * (1 + 2 * nibbles).astype(F)
        index = qs.reshape(-1).astype(np.int32) | (_bits(qh).reshape(-1).astype(np.int32) << 8)
        points = self.table.values[index].reshape(-1, BLOCK)
        return points * (1 - 2 * _bits(signs).reshape(-1, BLOCK)), scale


IQ3_GRIDS: tuple[LatticeGrid, ...] = (IQ3XXSGrid(), IQ3SGrid())
