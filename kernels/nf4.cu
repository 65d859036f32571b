// NF4 (bitsandbytes): codebook indices two per byte, the first in the high nibble; the check that
// they decode to codebook[code] * absmax of their block. The executable specification is nf4.py.
#include "qf_cuda.h"

// One thread per output byte; an odd count leaves the last low nibble zero, as bitsandbytes does.
QF_KERNEL void pack_nf4(const u8* codes, u8* out, i64 n) {
    QF_FOR(i, (n + 1) / 2) {
        const u8 lo = 2 * i + 1 < n ? (u8)(codes[2 * i + 1] & 15u) : (u8)0;
        out[i] = (u8)(((codes[2 * i] & 15u) << 4) | lo);
    }
}

// Double quantization: absmax[b] = quant_map[code[b]] * nested_absmax[b / nested_block] + offset.
QF_KERNEL void nf4_absmax(const u8* codes, const float* nested, const float* quant_map, i64 nested_block,
                          float offset, float* absmax, i64 blocks) {
    QF_FOR(b, blocks) { absmax[b] = quant_map[codes[b]] * nested[b / nested_block] + offset; }
}

// One thread per element: codebook[code] * absmax[i / block] against expected[i].
QF_KERNEL void verify_nf4(const u8* packed, const float* absmax, const float* codebook, i64 block,
                          const float* expected, i64 n, float atol, qf_verdict* verdict) {
    QF_FOR(i, n) {
        const u8 byte = packed[i / 2];
        const u8 code = (i % 2) ? (u8)(byte & 15u) : (u8)(byte >> 4);
        qf_check(verdict, (u64)i, codebook[code] * absmax[i / block], expected[i], atol);
    }
}
