// GGUF K-quant super-blocks of 256 (ggml-common.h: block_q4_K, block_q5_K, block_q6_K): codes plus the
// super-block fields the grid's split() chose, packed into ggml's bytes; and the check that those bytes
// decode, as ggml's dequantize_row_q*_K computes, to the method's reconstruction. The executable
// specification is gguf_blocks.py: its NumPy packers, and gguf-py's dequantize for the decode.
#include "qf_cuda.h"

enum { Q4_K, Q5_K, Q6_K };
QF_DEVICE i64 qf_kblock_bytes(i64 type) { return type == Q4_K ? 144 : type == Q5_K ? 176 : 210; }

// One thread per super-block b. codes: 256 signed codes (Q6_K's are -32..31); d, dmin: its fp32 scales
// (holding fp16 values); sc, mn: Q4_K/Q5_K's eight 6-bit scales and mins, or Q6_K's sixteen int8 scales in sc.
QF_KERNEL void pack_kquant(const i8* codes, const float* d, const float* dmin, const u8* sc, const u8* mn, u8* out,
                           i64 blocks, i64 type) {
    QF_FOR(b, blocks) {
        const i8* q = codes + 256 * b;
        u8* o = out + qf_kblock_bytes(type) * b;
        if (type == Q6_K) {
            const u8* s = sc + 16 * b;
            for (int n = 0; n < 2; ++n) {
                const i8* h = q + 128 * n;
                u8* ql = o + 64 * n;
                u8* qh = o + 128 + 32 * n;
                for (int l = 0; l < 32; ++l) {
                    u32 u[4];
                    for (int g = 0; g < 4; ++g) u[g] = (u32)(h[32 * g + l] + 32) & 63u;
                    ql[l] = (u8)((u[0] & 15u) | ((u[2] & 15u) << 4));
                    ql[32 + l] = (u8)((u[1] & 15u) | ((u[3] & 15u) << 4));
                    qh[l] = (u8)((u[0] >> 4) | ((u[1] >> 4) << 2) | ((u[2] >> 4) << 4) | ((u[3] >> 4) << 6));
                }
            }
            for (int j = 0; j < 16; ++j) o[192 + j] = s[j];
            qf_put_f16(o + 208, d[b]);
            continue;
        }
        const u8* s = sc + 8 * b;
        const u8* m = mn + 8 * b;
        qf_put_f16(o, d[b]);
        qf_put_f16(o + 2, dmin[b]);
        u8* scales = o + 4;  // get_scale_min_k4's layout
        for (int j = 0; j < 4; ++j) {
            scales[j] = (u8)((s[j] & 63u) | ((s[j + 4] >> 4) << 6));
            scales[j + 4] = (u8)((m[j] & 63u) | ((m[j + 4] >> 4) << 6));
            scales[j + 8] = (u8)((s[j + 4] & 15u) | ((m[j + 4] & 15u) << 4));
        }
        u8* qs = o + (type == Q5_K ? 48 : 16);
        for (int j = 0; j < 4; ++j)
            for (int l = 0; l < 32; ++l)
                qs[32 * j + l] = (u8)(((u32)q[64 * j + l] & 15u) | (((u32)q[64 * j + 32 + l] & 15u) << 4));
        if (type == Q5_K) {
            u8* qh = o + 16;
            for (int l = 0; l < 32; ++l) {
                u32 bits = 0;
                for (int k = 0; k < 8; ++k) bits |= (((u32)q[32 * k + l] >> 4) & 1u) << k;
                qh[l] = (u8)bits;
            }
        }
    }
}

// get_scale_min_k4 of ggml-quants.c.
QF_DEVICE void qf_scale_min_k4(int j, const u8* q, u32* sc, u32* m) {
    if (j < 4) {
        *sc = q[j] & 63u;
        *m = q[j + 4] & 63u;
    } else {
        *sc = (q[j + 4] & 15u) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// One thread per element of the tensor whose super-blocks are `data`.
QF_KERNEL void verify_kquant(const u8* data, i64 type, const float* expected, i64 n, float atol, qf_verdict* verdict) {
    QF_FOR(i, n) {
        const u8* o = data + qf_kblock_bytes(type) * (i / 256);
        const int k = (int)(i % 256);
        float decoded;
        if (type == Q6_K) {
            const int half = k / 128, g = (k % 128) / 32, l = k % 32;
            const u8 lo = o[64 * half + (g & 1) * 32 + l];
            const u32 nib = g < 2 ? (lo & 15u) : (u32)(lo >> 4);
            const u32 high = ((u32)o[128 + 32 * half + l] >> (2 * g)) & 3u;
            const i32 q = (i32)(nib | (high << 4)) - 32;
            const i8 scale = (i8)o[192 + 8 * half + l / 16 + 2 * g];
            decoded = qf_get_f16(o + 208) * (float)scale * (float)q;
        } else {
            const int j = k / 64, h = (k % 64) / 32, l = k % 32;
            u32 sc, m;
            qf_scale_min_k4(2 * j + h, o + 4, &sc, &m);
            const u8 byte = o[(type == Q5_K ? 48 : 16) + 32 * j + l];
            u32 u = h ? (u32)(byte >> 4) : (byte & 15u);
            if (type == Q5_K) u |= (((u32)o[16 + l] >> (2 * j + h)) & 1u) << 4;
            const float d1 = qf_get_f16(o) * (float)sc, m1 = qf_get_f16(o + 2) * (float)m;
            decoded = d1 * (float)u - m1;
        }
        qf_check(verdict, (u64)i, decoded, expected[i], atol);
    }
}
