"""GGUF block layouts: codes on a grid -> the bytes ggml stores, one NumPy packer per type (``PACKERS``).

Each packer takes a tensor's ``Encoded`` (codes shaped like the weight) and returns (rows, row bytes)
uint8 in ggml's block structs (ggml-common.h); gguf-py's ``quants.dequantize`` reads them back. K-quant
packers get the stored super-block fields from the grid's ``stored_fields``. ``pack_gguf`` and ``verify_gguf``
launch a kernel for the 32-element types (gguf_blocks.cu) and for Q4_K, Q5_K and Q6_K (kquant_blocks.cu:
the host's ``stored_fields`` gives the super-block fields, one per 256 codes; the kernel lays out the bytes);
these packers, and gguf-py's dequantize for the decode, are their specification. Q2_K, Q3_K, the IQ types and
MXFP4 stay NumPy: the first two only appear in the smallest llama.cpp mixes, the others are new (a lattice type's
bytes come out of its search whole).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from quantfab.kernels.backends import current
from quantfab.kernels.verdict import Verdict, compare, new_verdict, read_verdict
from quantfab.tasks.quantize.grids import GRIDS, Encoded
from quantfab.tasks.quantize.lattice import LatticeGrid

SOURCE, K_SOURCE = "gguf_blocks.cu", "kquant_blocks.cu"
LEGACY = {"Q8_0": (0, 34), "Q4_0": (1, 18), "Q4_1": (2, 20), "Q5_0": (3, 22), "Q5_1": (4, 24)}  # kernel id, bytes
KQUANT = {"Q4_K": (0, 144), "Q5_K": (1, 176), "Q6_K": (2, 210)}

QK_K = 256


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """(..., ) float32 holding fp16 values -> (..., 2) little-endian bytes (past fp16's range: Inf)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float32).astype("<f2").view(np.uint8).reshape(*np.shape(x), 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """(..., 32) codes -> (..., 16) bytes: element j in the low nibble, element j + 16 in the high one."""
    return ((codes[..., :16] & 0xF) | ((codes[..., 16:] & 0xF) << 4)).astype(np.uint8)


def _fifth_bits(codes: np.ndarray) -> np.ndarray:
    """(..., 32) 5-bit codes -> (..., 4) bytes of the little-endian uint32 whose bit j is element j's bit 4."""
    bits = ((codes.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(*codes.shape[:-1], 4)


def _blocks(enc: Encoded, size: int) -> tuple[int, np.ndarray]:
    rows, cols = enc.codes.shape
    return rows, enc.codes.reshape(rows, cols // size, size)


def pack_q8_0(enc: Encoded) -> np.ndarray:
    rows, q = _blocks(enc, 32)
    return np.concatenate([_fp16_bytes(enc.d), q.view(np.uint8)], axis=-1).reshape(rows, -1)


def pack_q4_0(enc: Encoded) -> np.ndarray:
    rows, q = _blocks(enc, 32)
    return np.concatenate([_fp16_bytes(enc.d), _nibbles((q.astype(np.int16) + 8).astype(np.uint8))], axis=-1).reshape(rows, -1)


def pack_q4_1(enc: Encoded) -> np.ndarray:
    assert enc.m is not None
    rows, q = _blocks(enc, 32)
    return np.concatenate([_fp16_bytes(enc.d), _fp16_bytes(enc.m), _nibbles(q.astype(np.uint8))], axis=-1).reshape(rows, -1)


def pack_q5_0(enc: Encoded) -> np.ndarray:
    rows, q = _blocks(enc, 32)
    u = (q.astype(np.int16) + 16).astype(np.uint8)
    return np.concatenate([_fp16_bytes(enc.d), _fifth_bits(u), _nibbles(u)], axis=-1).reshape(rows, -1)


def pack_q5_1(enc: Encoded) -> np.ndarray:
    assert enc.m is not None
    rows, q = _blocks(enc, 32)
    u = q.astype(np.uint8)
    return np.concatenate([_fp16_bytes(enc.d), _fp16_bytes(enc.m), _fifth_bits(u), _nibbles(u)], axis=-1).reshape(rows, -1)


def _super_blocks(enc: Encoded, offset: int) -> tuple[int, np.ndarray]:
    """(rows, cols) codes + offset -> (rows * cols / 256, 256) unsigned codes."""
    rows = enc.codes.shape[0]
    return rows, (enc.codes.astype(np.int16) + offset).astype(np.uint8).reshape(-1, QK_K)


def _crumbs(u: np.ndarray) -> np.ndarray:
    """(n, 256) 2-bit values -> (n, 64) bytes: per half of 128, byte l holds elements l, l+32, l+64, l+96."""
    q = u.reshape(-1, 2, 4, 32) & 3
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).astype(np.uint8).reshape(-1, 64)


def _k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> Q4_K/Q5_K's 12 bytes (get_scale_min_k4's layout)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    low = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return np.concatenate([low, mid, high], axis=1).astype(np.uint8)


def _split(name: str, enc: Encoded) -> dict[str, np.ndarray]:
    return GRIDS[name].stored_fields(enc)  # type: ignore[attr-defined]


def pack_q2_k(enc: Encoded) -> np.ndarray:
    rows, u = _super_blocks(enc, 0)
    s = _split("Q2_K", enc)
    scales = (s["scales"] | (s["mins"] << 4)).astype(np.uint8)
    out = np.concatenate([scales, _crumbs(u), _fp16_bytes(s["d"]), _fp16_bytes(s["dmin"])], axis=1)
    return out.reshape(rows, -1)


def pack_q3_k(enc: Encoded) -> np.ndarray:
    rows, u = _super_blocks(enc, 4)
    s = _split("Q3_K", enc)
    hmask = (((u.reshape(-1, 8, 32) >> 2) & 1) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    sc = (s["scales"].astype(np.int16) + 32).astype(np.uint8)  # (n, 16) 6-bit
    low = (sc[:, :8] & 0xF) | ((sc[:, 8:] & 0xF) << 4)
    high = sc.reshape(-1, 4, 4) >> 4  # [j // 4, j % 4]
    high = (high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)).astype(np.uint8)
    out = np.concatenate([hmask, _crumbs(u), low, high, _fp16_bytes(s["d"])], axis=1)
    return out.reshape(rows, -1)


def _pack_k4(name: str, enc: Encoded, fifth_bit: bool) -> np.ndarray:
    rows, u = _super_blocks(enc, 0)
    s = _split(name, enc)
    pairs = u.reshape(-1, 4, 2, 32)
    ql = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).astype(np.uint8).reshape(-1, 128)
    parts = [_fp16_bytes(s["d"]), _fp16_bytes(s["dmin"]), _k4_scales(s["scales"], s["mins"])]
    if fifth_bit:
        shifts = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
        parts.append((((pairs >> 4) & 1) << shifts).reshape(-1, 8, 32).sum(axis=1, dtype=np.uint8))
    return np.concatenate(parts + [ql], axis=1).reshape(rows, -1)


def pack_q4_k(enc: Encoded) -> np.ndarray:
    return _pack_k4("Q4_K", enc, fifth_bit=False)


def pack_q5_k(enc: Encoded) -> np.ndarray:
    return _pack_k4("Q5_K", enc, fifth_bit=True)


def pack_q6_k(enc: Encoded) -> np.ndarray:
    rows, u = _super_blocks(enc, 32)
    s = _split("Q6_K", enc)
    q = u.reshape(-1, 2, 4, 32)
    lo, hi = q & 0xF, q >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(-1, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    out = np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), s["scales"].view(np.uint8), _fp16_bytes(s["d"])], axis=1)
    return out.reshape(rows, -1)


def pack_iq4_nl(enc: Encoded) -> np.ndarray:
    rows, q = _blocks(enc, 32)
    return np.concatenate([_fp16_bytes(enc.d), _nibbles(q.astype(np.uint8))], axis=-1).reshape(rows, -1)


def pack_iq4_xs(enc: Encoded) -> np.ndarray:
    """block_iq4_xs: d, the 6-bit scales' high crumbs (scales_h) and low nibbles (scales_l), then 8 x 16 nibble
    bytes as IQ4_NL lays out each 32."""
    rows = enc.codes.shape[0]
    s = _split("IQ4_XS", enc)
    levels = (s["scales"].astype(np.int16) + 32).astype(np.uint16)  # (n, 8)
    low = (levels & 0xF).astype(np.uint8)
    scales_h = (((levels >> 4) & 3) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    qs = _nibbles(enc.codes.astype(np.uint8).reshape(-1, 8, 32)).reshape(-1, 128)
    return np.concatenate([_fp16_bytes(s["d"]), scales_h.astype("<u2").view(np.uint8).reshape(-1, 2),
                           low[:, 0::2] | (low[:, 1::2] << 4), qs], axis=1).reshape(rows, -1)


def pack_mxfp4(enc: Encoded) -> np.ndarray:
    """block_mxfp4: the E8M0 exponent (d = 2^(e - 128)), then 16 bytes of nibbles as Q4_0 lays out its 32."""
    rows, q = _blocks(enc, 32)
    e = (np.frexp(enc.d)[1] + 127).astype(np.uint8).reshape(rows, -1, 1)
    return np.concatenate([e, _nibbles(q.astype(np.uint8))], axis=-1).reshape(rows, -1)


def pack_lattice(enc: Encoded) -> np.ndarray:
    """IQ1_*, IQ2_*, IQ3_*: a group's codebook index, signs and scales come out of the search as ggml's bytes."""
    return enc.extra["blocks"]


PACKERS: dict[str, Callable[[Encoded], np.ndarray]] = {
    "Q8_0": pack_q8_0, "Q4_0": pack_q4_0, "Q4_1": pack_q4_1, "Q5_0": pack_q5_0, "Q5_1": pack_q5_1,
    "Q2_K": pack_q2_k, "Q3_K": pack_q3_k, "Q4_K": pack_q4_k, "Q5_K": pack_q5_k, "Q6_K": pack_q6_k,
    "IQ4_NL": pack_iq4_nl, "IQ4_XS": pack_iq4_xs, "MXFP4": pack_mxfp4,
    **{t: pack_lattice for t, grid in GRIDS.items() if isinstance(grid, LatticeGrid)},
}


def pack_gguf(type_name: str, enc: Encoded) -> np.ndarray:
    """(rows, row bytes) uint8 of one tensor, on the current backend where a kernel exists for the type."""
    be = current()
    if be.name == "numpy" or type_name not in LEGACY | KQUANT:
        return PACKERS[type_name](enc)
    if type_name in KQUANT:
        return _pack_kquant(be, type_name, enc)
    kind, size = LEGACY[type_name]
    rows, cols = enc.codes.shape
    blocks = rows * cols // 32
    out = be.xp.empty((rows, cols // 32 * size), be.xp.uint8)
    m = enc.m if enc.m is not None else np.zeros(1, np.float32)
    be.launch(SOURCE, "pack_gguf_legacy", blocks, be.to_device(enc.codes.astype(np.int8, copy=False)),
              be.to_device(enc.d.astype(np.float32, copy=False)), be.to_device(m.astype(np.float32, copy=False)), out,
              blocks, kind)
    return be.result(out, enc.codes)


def _pack_kquant(be, type_name: str, enc: Encoded) -> np.ndarray:
    kind, size = KQUANT[type_name]
    rows, cols = enc.codes.shape
    blocks = rows * cols // QK_K
    s = _split(type_name, enc)
    none = np.zeros(1, np.uint8)
    fields = [s["d"], s.get("dmin", np.zeros(1, np.float32))]
    small = [np.ascontiguousarray(s["scales"]).view(np.uint8), s.get("mins", none)]
    out = be.xp.empty((rows, cols // QK_K * size), be.xp.uint8)
    be.launch(K_SOURCE, "pack_kquant", blocks, be.to_device(enc.codes.astype(np.int8, copy=False)),
              *(be.to_device(np.asarray(f, np.float32)) for f in fields),
              *(be.to_device(np.ascontiguousarray(f, np.uint8)) for f in small), out, blocks, kind)
    return be.result(out, enc.codes)


def decode_legacy_reference(type_name: str, data: np.ndarray, n: int) -> np.ndarray:
    """Float32 values of ``n`` elements stored in 32-element blocks, as ggml's dequantize_row_* computes them."""
    size = LEGACY[type_name][1]
    b = data.reshape(-1)[: n // 32 * size].reshape(-1, size)
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    if type_name == "Q8_0":
        return (d * b[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    has_min = type_name in ("Q4_1", "Q5_1")
    m = b[:, 2:4].copy().view("<f2").astype(np.float32) if has_min else None
    pos = 4 if has_min else 2
    high = np.zeros((b.shape[0], 32), np.int32)
    if type_name in ("Q5_0", "Q5_1"):
        qh = b[:, pos:pos + 4].copy().view("<u4").astype(np.uint32)
        high = (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)
        pos += 4
    nib = b[:, pos:pos + 16].astype(np.int32)
    u = np.concatenate([nib & 15, nib >> 4], axis=1) | high
    if has_min:
        return (d * u.astype(np.float32) + m).astype(np.float32).reshape(-1)
    return (d * (u - {"Q4_0": 8, "Q5_0": 16}[type_name]).astype(np.float32)).reshape(-1)


def verify_gguf(type_name: str, data: np.ndarray, expected: np.ndarray, atol: float = 0.0) -> Verdict:
    """Decode one tensor's stored blocks and compare them with ``expected`` (float32, the tensor's shape)."""
    be = current()
    n = expected.size
    if be.name == "numpy" or type_name not in LEGACY | KQUANT:
        if type_name in LEGACY:
            return compare(decode_legacy_reference(type_name, data, n), expected, atol)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        decoded = dequantize(np.asarray(data).reshape(expected.shape[0], -1), GGMLQuantizationType[type_name])
        return compare(decoded.astype(np.float32), expected, atol)
    source, kernel, kind = (SOURCE, "verify_gguf_legacy", LEGACY[type_name][0]) if type_name in LEGACY else \
        (K_SOURCE, "verify_kquant", KQUANT[type_name][0])
    verdict = new_verdict(be)
    be.launch(source, kernel, n, be.to_device(data).reshape(-1), kind,
              be.to_device(expected.reshape(-1).astype(np.float32, copy=False)), n, float(atol), verdict)
    return read_verdict(be, verdict, n)
