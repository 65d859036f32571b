// GGUF's 32-element blocks (ggml-common.h: block_q8_0, q4_0, q4_1, q5_0, q5_1): codes and fp16 scales
// packed into the bytes ggml stores, and the check that those bytes decode to the method's reconstruction.
// The executable specification is gguf_blocks.py.
#include "qf_cuda.h"

enum { Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 };
QF_DEVICE i64 qf_block_bytes(i64 type) { return type == Q8_0 ? 34 : type == Q4_0 ? 18 : type == Q4_1 ? 20 : type == Q5_0 ? 22 : 24; }
QF_DEVICE bool qf_has_min(i64 type) { return type == Q4_1 || type == Q5_1; }
QF_DEVICE i32 qf_code_offset(i64 type) { return type == Q4_0 ? 8 : type == Q5_0 ? 16 : 0; }

// One thread per block: codes[32 b .. 32 b + 31] with scale d[b] (and min m[b]) -> out[b * block_bytes ..].
QF_KERNEL void pack_gguf_legacy(const i8* codes, const float* d, const float* m, u8* out, i64 blocks, i64 type) {
    QF_FOR(b, blocks) {
        const i8* q = codes + 32 * b;
        u8* o = out + qf_block_bytes(type) * b;
        qf_put_f16(o, d[b]);
        o += 2;
        if (qf_has_min(type)) { qf_put_f16(o, m[b]); o += 2; }
        if (type == Q8_0) {
            for (int j = 0; j < 32; ++j) o[j] = (u8)q[j];
            continue;
        }
        const i32 off = qf_code_offset(type);
        if (type == Q5_0 || type == Q5_1) {  // bit 4 of every code, element j at bit j of a little-endian u32
            u32 high = 0;
            for (int j = 0; j < 32; ++j) high |= (((u32)(q[j] + off) >> 4) & 1u) << j;
            for (int k = 0; k < 4; ++k) o[k] = (u8)(high >> (8 * k));
            o += 4;
        }
        for (int j = 0; j < 16; ++j) o[j] = (u8)(((u32)(q[j] + off) & 15u) | (((u32)(q[j + 16] + off) & 15u) << 4));
    }
}

// One thread per element of the (rows * cols) tensor whose blocks are `data`.
QF_KERNEL void verify_gguf_legacy(const u8* data, i64 type, const float* expected, i64 n, float atol, qf_verdict* verdict) {
    QF_FOR(i, n) {
        const i64 j = i % 32;
        const u8* o = data + qf_block_bytes(type) * (i / 32);
        const float d = qf_get_f16(o);
        o += 2;
        float m = 0.0f;
        if (qf_has_min(type)) { m = qf_get_f16(o); o += 2; }
        float decoded;
        if (type == Q8_0) {
            decoded = d * (float)(i8)o[j];
        } else {
            u32 high = 0;
            if (type == Q5_0 || type == Q5_1) {
                high = ((((u32)o[j / 8]) >> (j % 8)) & 1u) << 4;
                o += 4;
            }
            const u32 u = ((j < 16 ? o[j] : (o[j - 16] >> 4)) & 15u) | high;
            decoded = qf_has_min(type) ? d * (float)u + m : d * (float)((i32)u - qf_code_offset(type));
        }
        qf_check(verdict, (u64)i, decoded, expected[i], atol);
    }
}
