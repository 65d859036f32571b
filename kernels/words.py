"""Integer codes in int32 words: the NumPy specification of words.cu and the host calls that launch it.

GPTQ, AWQ and compressed-tensors all store a (rows, cols) matrix of signed codes this way; a
``WordLayout`` says which axis the words run along, how the words are laid out, the offset that makes
codes unsigned and AWQ's interleave. Packing is dense: with bits that do not divide 32, a code may
straddle two words (compressed-tensors' ``pack_to_int32``); each line is padded with zero bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantfab.kernels.backends import current
from quantfab.kernels.verdict import Verdict, compare, new_verdict, read_verdict

SOURCE = "words.cu"


@dataclass(frozen=True)
class WordLayout:
    bits: int
    axis: int  # 1: one line of words per row; 0: one per column
    line_major: bool  # words stored (lines, words per line); else (words per line, lines)
    offset: int  # added to a signed code before masking to ``bits``
    order: tuple[int, ...] | None = None  # slot j of each run of 32 // bits holds element order[j]

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8 or self.axis not in (0, 1):
            raise ValueError(f"bad word layout {self}")
        if self.order is not None and (32 % self.bits or sorted(self.order) != list(range(32 // self.bits))):
            raise ValueError(f"an order must permute the {32 // self.bits} codes of one word")

    def params(self, shape: tuple[int, int]) -> np.ndarray:
        """The kernel's i64[8]: bits, axis, line_major, per, offset, lines, length, words_per_line."""
        lines, length = (shape[0], shape[1]) if self.axis == 1 else (shape[1], shape[0])
        per = len(self.order) if self.order else 1
        if length % per:
            raise ValueError(f"an interleaved layout packs whole runs of {per} codes, not lines of {length}")
        return np.array([self.bits, self.axis, self.line_major, per, self.offset, lines, length,
                         -(-length * self.bits // 32)], np.int64)

    def slots(self) -> np.ndarray:
        return np.array(self.order or (0,), np.int32)

    def words_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        p = self.params(shape)
        return (int(p[5]), int(p[7])) if self.line_major else (int(p[7]), int(p[5]))


def pack_words_reference(codes: np.ndarray, layout: WordLayout) -> np.ndarray:
    lines = codes if layout.axis == 1 else codes.T
    n, length = lines.shape
    u = ((lines.astype(np.int32) + layout.offset) & ((1 << layout.bits) - 1)).astype(np.uint32)
    wpl = -(-length * layout.bits // 32)
    if 32 % layout.bits == 0:  # whole codes per word: OR each run of 32 // bits into one word
        per = 32 // layout.bits
        runs = np.concatenate([u, np.zeros((n, wpl * per - length), np.uint32)], axis=1).reshape(n, wpl, per)
        if layout.order:
            runs = runs[..., list(layout.order)]
        words = np.bitwise_or.reduce(runs << (np.arange(per, dtype=np.uint32) * np.uint32(layout.bits)), axis=-1)
    else:  # a bit stream: each code's bits, low first, then 32 bits per word
        bits = (u[..., None] >> np.arange(layout.bits, dtype=np.uint32)) & 1
        stream = np.concatenate([bits.reshape(n, -1).astype(np.uint8),
                                 np.zeros((n, wpl * 32 - length * layout.bits), np.uint8)], axis=1)
        words = np.packbits(stream, axis=1, bitorder="little").view("<u4").reshape(n, wpl)
    words = np.asarray(words, np.uint32).view(np.int32)
    return np.ascontiguousarray(words if layout.line_major else words.T)


def unpack_words_reference(words: np.ndarray, layout: WordLayout, shape: tuple[int, int]) -> np.ndarray:
    """Signed int32 codes (rows, cols) from words packed with ``layout``."""
    p = layout.params(shape)
    n, length, wpl = int(p[5]), int(p[6]), int(p[7])
    w = (words if layout.line_major else words.T).astype(np.int32).view(np.uint32).astype(np.uint64)
    w = np.concatenate([w, np.zeros((n, 1), np.uint64)], axis=1) if wpl else w
    slots = np.arange(length)
    if layout.order:
        per = len(layout.order)
        slots = (slots // per) * per + np.argsort(layout.order)[slots % per]
    bitpos = slots.astype(np.uint64) * np.uint64(layout.bits)
    at = (bitpos // np.uint64(32)).astype(np.int64)
    window = w[:, at] | (w[:, at + 1] << np.uint64(32))
    u = (window >> (bitpos % np.uint64(32))) & np.uint64((1 << layout.bits) - 1)
    codes = u.astype(np.int32) - layout.offset
    return np.ascontiguousarray(codes if layout.axis == 1 else codes.T)


def pack_words(codes: np.ndarray, layout: WordLayout) -> np.ndarray:
    """Signed int8 codes (rows, cols) -> int32 words, on the current backend."""
    be = current()
    if be.name == "numpy":
        return pack_words_reference(codes, layout)
    params = layout.params(codes.shape)
    out = be.xp.empty(layout.words_shape(codes.shape), be.xp.int32)
    be.launch(SOURCE, "pack_words", out.size, be.to_device(codes.astype(np.int8, copy=False)), out,
              be.to_device(params), be.to_device(layout.slots()), codes.shape[1])
    return be.result(out, codes)


@dataclass(frozen=True)
class PackedInts:
    """A packed (rows, cols) integer matrix as a file stores it: scale[r, c // group] * (q - z)."""

    words: np.ndarray
    layout: WordLayout
    scales: np.ndarray  # float32 or float16, (rows, groups) or, with scales_transposed, (groups, rows)
    group: int
    scales_transposed: bool = False
    zeros: np.ndarray | None = None  # words of the (rows, groups) zero points
    zero_layout: WordLayout | None = None
    zero_adjust: int = 0  # added to each unpacked zero point (GPTQ v1 stores zero - 1)


def decode_reference(p: PackedInts, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = shape
    groups = -(-cols // p.group)
    q = unpack_words_reference(p.words, p.layout, shape).astype(np.float32)
    scales = (p.scales.T if p.scales_transposed else p.scales).astype(np.float32)
    g = np.arange(cols) // p.group
    z = np.zeros((rows, groups), np.float32)
    if p.zeros is not None and p.zero_layout is not None:
        z = (unpack_words_reference(p.zeros, p.zero_layout, (rows, groups)) + p.zero_adjust).astype(np.float32)
    return (scales[:, g] * (q - z[:, g])).astype(np.float32)


def verify_words(p: PackedInts, expected: np.ndarray, atol: float = 0.0) -> Verdict:
    """Decode ``p`` and compare it with ``expected`` (float32, rows x cols) in one pass."""
    be = current()
    if be.name == "numpy":
        return compare(decode_reference(p, expected.shape), expected, atol)
    rows, cols = expected.shape
    groups = -(-cols // p.group)
    s_row, s_group = (1, rows) if p.scales_transposed else (groups, 1)
    zeros, zlay = (p.zeros, p.zero_layout) if p.zeros is not None and p.zero_layout is not None else \
        (np.zeros(1, np.int32), WordLayout(8, 1, True, 0))  # never read
    verdict = new_verdict(be)
    be.launch(SOURCE, "verify_words", expected.size, be.to_device(p.words), be.to_device(p.layout.params((rows, cols))),
              be.to_device(_inverse(p.layout)), be.to_device(p.scales.astype(np.float32, copy=False)), s_row, s_group,
              p.group, be.to_device(zeros), be.to_device(zlay.params((rows, groups))), be.to_device(_inverse(zlay)),
              p.zeros is not None, p.zero_adjust, be.to_device(expected.astype(np.float32, copy=False)), rows, cols,
              float(atol), verdict)
    return read_verdict(be, verdict, expected.size)


def _inverse(layout: WordLayout) -> np.ndarray:
    return np.argsort(layout.slots()).astype(np.int32)
