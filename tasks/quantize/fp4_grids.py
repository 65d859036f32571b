"""FP4 grids: E2M1 codes (±0, 0.5, 1, 1.5, 2, 3, 4, 6) with the two scale formats vLLM serves them with.

NVFP4: a scale per 16 elements of a row, stored as FP8 E4M3, over a float32 global scale per tensor (shared by
the Linears the engine fuses: those reading one input). MXFP4 (OCP microscaling): a power-of-two scale per 32
elements, stored as its E8M0 exponent. Both follow compressed-tensors' arithmetic: its observer's scales, its
rounding (nearest, ties to the even code, a negative value that rounds to 0 keeps its sign, -0.0 does not) and
its decompressor, which hands back bfloat16, so ``decode_values`` rounds to bfloat16 too.

A code is the 4-bit pattern sign << 3 | magnitude index, as compressed-tensors packs two per byte.

``GGMLMXFP4Grid`` is llama.cpp's MXFP4 (GGUF's MXFP4_MOE experts): the same E2M1 values and E8M0 scales, but
llama.cpp's exponent rule, its first-index tie rule and a float32 decode.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from quantfab.tasks.activations import fp4_global_scale
from quantfab.tasks.quantize.float_grids import e4m3_decode, e4m3_encode
from quantfab.tasks.quantize.grid_base import Encoded, Grid

E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
E2M1_MAX = np.float32(6.0)
# |x| above each bound takes the next value; a |x| equal to a bound goes to the even code: 0.25 -> 0, 0.75 -> 1,
# 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
_UPPER = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
_TIES_UP = np.array([False, True, False, True, False, True, False])  # the bound itself rounds up


def e2m1_encode(x: np.ndarray) -> np.ndarray:
    """4-bit E2M1 codes (int8, 0..15) of float32 values already divided by their scale."""
    a = np.minimum(np.abs(x), E2M1_MAX)
    index = np.zeros(a.shape, np.int8)
    for bound, up in zip(_UPPER, _TIES_UP):
        index += (a >= bound) if up else (a > bound)
    return index | np.where(x < 0, np.int8(8), np.int8(0))  # -0.0 is +0 (torch.sign(-0.0) * 0)


def e2m1_decode(q: np.ndarray) -> np.ndarray:
    """float32 values of 4-bit E2M1 codes."""
    value = E2M1_VALUES[q & 7]
    return np.where(q & 8, -value, value).astype(np.float32)


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded to bfloat16 (nearest, ties to even) and back, as torch's ``.to(torch.bfloat16)``."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(x), x, rounded.view(np.float32)).astype(np.float32)


class NVFP4Grid(Grid):
    """NVFP4: E2M1 codes, a scale per 16 elements stored as E4M3 relative to a float32 global scale.

    global = 448 * 6 / absmax of the tensor (of every Linear fused with it: ``bind``); a block's stored scale is
    E4M3(global * absmax / 6), 0.125 where that is 0; ``d`` holds the effective scale, stored / global (float32).
    Unbound, the grid takes the global scale of the tensor it is given (a whole tensor, as rtn's reference).
    """

    name, bits, block, symmetric, qmin, qmax = "NVFP4", 4, 16, True, -6, 6
    scale_dtype = np.float32
    fused_scale = True

    def __init__(self, global_scale: float | None = None):
        self.global_scale = None if global_scale is None else np.float32(global_scale)

    def bind(self, weights: Sequence[np.ndarray]) -> "NVFP4Grid":
        return NVFP4Grid(fp4_global_scale(max(float(np.abs(w).max()) for w in weights)))

    def _global(self, w: np.ndarray) -> np.float32:
        return self.global_scale if self.global_scale is not None else fp4_global_scale(float(np.abs(w).max()))

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        g = self._global(w)
        absmax = np.abs(self.blocks(w)).max(axis=-1) * np.float32(ratio)
        stored = e4m3_decode(e4m3_encode((absmax / E2M1_MAX).astype(np.float32) * g))
        stored = np.where(stored == 0, np.float32(0.125), stored)
        return (stored / g).astype(np.float32), None

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return e2m1_encode(np.divide(x, d, dtype=np.float32))

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return to_bfloat16(np.multiply(e2m1_decode(q), d, dtype=np.float32))

    def finalize(self, enc: Encoded) -> Encoded:
        """Record the global scale the block scales are relative to (the format stores it)."""
        if self.global_scale is None:
            raise RuntimeError("NVFP4: finalize needs the grid bound to its tensor's global scale (bind)")
        return Encoded(enc.codes, enc.d, None, {"global_scale": np.array([self.global_scale], np.float32)})

    def reference(self, w: np.ndarray, importance: np.ndarray | None = None) -> Encoded:
        grid = self if self.global_scale is not None else self.bind([w])
        d, _ = grid.scale_candidates(w, 1.0)
        return grid.finalize(Encoded(grid.encode(w, d, None), d, None))

    @staticmethod
    def stored_scales(enc: Encoded) -> np.ndarray:
        """The E4M3 block scales (as int8 bit patterns) the file holds: d times the global scale, exactly."""
        return e4m3_encode(enc.d * enc.extra["global_scale"][0])


class MXFP4Grid(Grid):
    """MXFP4: E2M1 codes, a power-of-two scale per 32 elements stored as its biased exponent (E8M0).

    The exponent is that of the block's absmax rounded to a power of two (up from 1.75 times one), minus 2 (6's
    exponent), biased by 127 and clamped to [0, 255]; an all-zero block gets exponent 0 (scale 2^-127).
    """

    name, bits, block, symmetric, qmin, qmax = "MXFP4", 4, 32, True, -6, 6
    scale_dtype = np.float32

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        absmax = (np.abs(self.blocks(w)).max(axis=-1) * np.float32(ratio)).astype(np.float32)
        return mx_scale(mx_exponent(absmax)), None

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return e2m1_encode(np.divide(x, d, dtype=np.float32))

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return to_bfloat16(np.multiply(e2m1_decode(q), d, dtype=np.float32))


def mx_exponent(absmax: np.ndarray) -> np.ndarray:
    """The biased E8M0 exponent (uint8) of blocks whose largest magnitude is ``absmax`` (float32)."""
    bits = absmax.astype(np.float32).view(np.uint32)
    power = ((bits + np.uint32(1 << 21)) & np.uint32(0xFF800000)).view(np.float32)  # to a power of two, up from 1.75
    with np.errstate(divide="ignore"):
        exponent = 127 + np.floor(np.log2(power)) - 2
    return np.clip(np.rint(exponent), 0, 255).astype(np.uint8)


def mx_scale(exponent: np.ndarray) -> np.ndarray:
    """float32 scales 2^(e - 127) of biased E8M0 exponents."""
    return np.ldexp(np.float32(1), exponent.astype(np.int32) - 127).astype(np.float32)


GGML_FP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)  # kvalues_mxfp4: 2 x E2M1


class GGMLMXFP4Grid(Grid):
    """llama.cpp's MXFP4 (the GGUF MXFP4_MOE file type's expert weights): 32 E2M1 codes and an E8M0 exponent e.

    It rounds otherwise than compressed-tensors' MXFP4, hence a name of its own: e = floor(log2(absmax)) - 2 + 127
    (0 for a block of zeros), d = 2^(e - 128) against doubled E2M1 values, each value the nearest, the first index
    on a tie (quantize_row_mxfp4_ref), decoded in float32. A code is the index into kvalues_mxfp4 (8 is -0, never
    chosen). llama.cpp ignores an importance matrix here.
    """

    name, bits, block, symmetric, qmin, qmax = "MXFP4_GGML", 4, 32, True, 0, 15
    scale_dtype = np.float32

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        absmax = (np.abs(self.blocks(w)).max(axis=-1) * np.float32(ratio)).astype(np.float32)
        return ggml_mx_scale(ggml_mx_exponent(absmax)), None

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        err = np.abs(np.multiply(GGML_FP4, d[..., None], dtype=np.float32) - x[..., None])
        return np.argmin(err, axis=-1).astype(np.int8)

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        return np.multiply(GGML_FP4[q.astype(np.intp)], d, dtype=np.float32)


def ggml_mx_exponent(absmax: np.ndarray) -> np.ndarray:
    """llama.cpp's E8M0 exponent (uint8) of blocks whose largest magnitude is ``absmax``: floor(log2) - 2 + 127,
    narrowed to 8 bits as C narrows it, 0 for zero."""
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(absmax.astype(np.float32))) - 2 + 127
    return np.where(absmax > 0, e, 0).astype(np.int32).astype(np.uint8)


def ggml_mx_scale(exponent: np.ndarray) -> np.ndarray:
    """GGML_E8M0_TO_FP32_HALF: 2^(e - 128) in float32 (denormal for e < 2)."""
    return np.ldexp(np.float32(1), exponent.astype(np.int32) - 128).astype(np.float32)
