"""NF4 nibbles: the NumPy specification of nf4.cu and the host calls that launch it.

bitsandbytes stores the 4-bit codebook indices of the flattened weight two per byte, the first of each
pair in the high nibble; each block of ``block`` elements has one absmax, itself 8-bit with a nested
absmax per 256 blocks plus an offset when double-quantized.
"""

from __future__ import annotations

import numpy as np

from quantfab.kernels.backends import current
from quantfab.kernels.verdict import Verdict, compare, new_verdict, read_verdict

SOURCE = "nf4.cu"


def pack_nf4_reference(codes: np.ndarray) -> np.ndarray:
    c = codes.reshape(-1).astype(np.uint8) & 15
    if c.size % 2:
        c = np.concatenate([c, np.zeros(1, np.uint8)])
    return ((c[0::2] << 4) | c[1::2]).astype(np.uint8)


def unpack_nf4_reference(packed: np.ndarray, n: int) -> np.ndarray:
    p = packed.reshape(-1)
    codes = np.empty(p.size * 2, np.uint8)
    codes[0::2], codes[1::2] = p >> 4, p & 15
    return codes[:n]


def absmax_reference(codes: np.ndarray, nested: np.ndarray, quant_map: np.ndarray, nested_block: int,
                     offset: float) -> np.ndarray:
    scale = np.repeat(nested.astype(np.float32), nested_block)[: codes.size]
    return (quant_map[codes.astype(np.int64)] * scale + np.float32(offset)).astype(np.float32)


def pack_nf4(codes: np.ndarray) -> np.ndarray:
    """Codebook indices (any shape, flattened) -> bytes, on the current backend."""
    be = current()
    if be.name == "numpy":
        return pack_nf4_reference(codes)
    n = codes.size
    out = be.xp.empty((n + 1) // 2, be.xp.uint8)
    be.launch(SOURCE, "pack_nf4", out.size, be.to_device(codes.reshape(-1).astype(np.uint8, copy=False)), out, n)
    return be.result(out, codes)


def verify_nf4(packed: np.ndarray, absmax: np.ndarray, codebook: np.ndarray, block: int, expected: np.ndarray,
               nested: tuple[np.ndarray, np.ndarray, int, float] | None = None, atol: float = 0.0) -> Verdict:
    """Decode packed nibbles (absmax first from its 8-bit codes when ``nested`` = (nested_absmax, quant_map,
    nested_block, offset)) and compare with ``expected``, flattened, in one pass."""
    be = current()
    n = expected.size
    if be.name == "numpy":
        scale = absmax if nested is None else absmax_reference(absmax, nested[0], nested[1], nested[2], nested[3])
        decoded = codebook[unpack_nf4_reference(packed, n).astype(np.int64)] * np.repeat(scale, block)[:n]
        return compare(decoded.astype(np.float32), expected, atol)
    if nested is None:
        scale = be.to_device(absmax.reshape(-1).astype(np.float32, copy=False))
    else:
        scale = be.xp.empty(absmax.size, be.xp.float32)
        be.launch(SOURCE, "nf4_absmax", absmax.size, be.to_device(absmax.reshape(-1).astype(np.uint8, copy=False)),
                  be.to_device(nested[0].astype(np.float32, copy=False)), be.to_device(nested[1].astype(np.float32)),
                  nested[2], float(nested[3]), scale, absmax.size)
    verdict = new_verdict(be)
    be.launch(SOURCE, "verify_nf4", n, be.to_device(packed.reshape(-1)), scale,
              be.to_device(codebook.astype(np.float32)), block,
              be.to_device(expected.reshape(-1).astype(np.float32, copy=False)), n, float(atol), verdict)
    return read_verdict(be, verdict, n)
