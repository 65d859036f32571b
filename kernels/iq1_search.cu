// llama.cpp's 1-bit lattice searches (quantize_iq1_s, quantize_iq1_m), one thread per 256-weight super-block,
// writing its ggml bytes. The executable specification is tasks/quantize/iq1_grids.py (``search_reference``): the
// same float32 operations in the same order (sums in element order, llama.cpp's nearest_int, first on a tie, no
// fused multiply-add), so the bytes equal the NumPy reference's, and through it llama-quantize's.
//
// A block's weights are sorted ascending (equal values keep their order); every split of the sorted block into
// levels -1 / 0 / 1 is scored from prefix sums, under each delta sign; a group of 8 whose levels are off the
// codebook goes to its best neighbour; the super-block scale follows from the largest block scale.
//
// The codebook comes from LatticeTable: points (entries, 8) as 2 * level + 1, index (key -> entry or -1), slot
// (key -> its row of neighbours), neighbours (rows, width) nearest first, counts (each row's length).
#include "qf_cuda.h"

#define IQ1_SUPER 256
#define IQ1_GROUP 8
#define IQ1_MAX_BLOCK 32
#define IQ1_FLT_MAX 3.40282347e+38f  // llama.cpp's scans start from -FLT_MAX

// A level 0 / 1 / 2 (-1, 0, 1) shifted by +1/8, or by -1/8 under a minus delta: exact in float32.
QF_DEVICE float iq1_shifted(bool minus, int level) { return (float)(level - 1) + (minus ? -0.125f : 0.125f); }

// llama.cpp's nearest_int: the 1.5 * 2^23 trick (round half to even; what it does past its range is kept too).
QF_DEVICE i32 iq1_nearest_int(float v) {
    const float shifted = v + 12582912.0f;
    return (i32)(qf_float_bits(shifted) & 0x007FFFFFu) - 0x00400000;
}

struct iq1_table {
    const i8* points;
    const i32* index;
    const i32* slot;
    const short* neighbours;  // int16, as LatticeTable keeps them
    const i32* counts;
    i64 width;
};

// llama.cpp's weights: importance * sqrt(sigma2 + x^2), sigma2 = 2 * mean x^2 over the super-block; x^2 without one.
QF_DEVICE void iq1_weights(const float* x, const float* importance, float* w) {
    if (!importance) {
        for (int i = 0; i < IQ1_SUPER; ++i) w[i] = x[i] * x[i];
        return;
    }
    float sumx2 = 0.0f;
    for (int i = 0; i < IQ1_SUPER; ++i) sumx2 = sumx2 + x[i] * x[i];
    const float sigma2 = 2.0f * sumx2 / (float)IQ1_SUPER;
    for (int i = 0; i < IQ1_SUPER; ++i) w[i] = importance[i] * sqrtf(sigma2 + x[i] * x[i]);
}

// Whether the block's largest |x| is below eps: such a block is left at scale 0.
QF_DEVICE bool iq1_below(const float* x, int n, float eps) {
    float top = fabsf(x[0]);
    for (int i = 1; i < n; ++i) top = fmaxf(top, fabsf(x[i]));
    return top < eps;
}

// Positions of the block in ascending order of x, equal values in their order (an insertion sort: stable, as
// glibc's qsort, a merge sort at these sizes, is).
QF_DEVICE void iq1_sort(const float* x, int n, int* order) {
    for (int i = 0; i < n; ++i) {
        int j = i;
        while (j > 0 && x[order[j - 1]] > x[i]) {
            order[j] = order[j - 1];
            --j;
        }
        order[j] = i;
    }
}

// llama.cpp's running best over candidate (sum qx, sum q2) pairs: a candidate wins when qx^2 > best * q2.
QF_DEVICE bool iq1_offer(float qx, float q2, float* best, float* scale) {
    if (!(q2 > 0.0f && qx * qx > *best * q2)) return false;
    *scale = qx / q2;
    *best = *scale * qx;
    return true;
}

// Levels of the winning split: sorted positions below i1 at 0, below i2 at 1, the rest at 2; mirrored for a
// negative scale (the caller flips the delta signs with it).
QF_DEVICE void iq1_levels(const int* order, int n, int i1, int i2, bool mirror, u8* level) {
    for (int j = 0; j < n; ++j) {
        const u8 l = (u8)((j >= i1) + (j >= i2));
        level[order[j]] = mirror ? (u8)(2 - l) : l;
    }
}

// iq1_find_best_neighbour2: the neighbour of an off-codebook key minimizing sum w * (scale * v - x)^2 over the
// group, v its shifted levels, summed in coordinate order; the first of equal sums. Each coordinate's term takes
// one of 3 values, computed once: a neighbour's sum adds the same floats in the same order.
QF_DEVICE i32 iq1_nearest(const iq1_table& t, i32 key, const float* x, const float* w, float scale, bool minus) {
    float term[IQ1_GROUP][3];
    for (int i = 0; i < IQ1_GROUP; ++i) {
        for (int level = 0; level < 3; ++level) {
            const float diff = scale * iq1_shifted(minus, level) - x[i];
            term[i][level] = w[i] * diff * diff;
        }
    }
    const i32 row = t.slot[key];
    const short* list = t.neighbours + (i64)row * t.width;
    i32 best_entry = -1;
    float best = 0.0f;
    for (i32 n = 0; n < t.counts[row]; ++n) {
        const i8* p = t.points + IQ1_GROUP * list[n];
        float d2 = 0.0f;
        for (int i = 0; i < IQ1_GROUP; ++i) d2 = d2 + term[i][(p[i] - 1) / 2];
        if (best_entry < 0 || d2 < best) {
            best = d2;
            best_entry = list[n];
        }
    }
    return best_entry;
}

// Each group's codebook entry (its own, or its best neighbour at ``scale``) and the block's scale, refitted to the
// entries' shifted levels where a group left the codebook and the fit is positive.
QF_DEVICE float iq1_points(const iq1_table& t, const float* x, const float* w, const u8* level, int n,
                           const bool* minus, float scale, i32* entry) {
    bool off = false;
    for (int k = 0; k < n / IQ1_GROUP; ++k) {
        i32 key = 0;
        for (int j = 0; j < IQ1_GROUP; ++j) key |= (i32)level[IQ1_GROUP * k + j] << (2 * j);
        entry[k] = t.index[key];
        if (entry[k] < 0) {
            off = true;
            entry[k] = iq1_nearest(t, key, x + IQ1_GROUP * k, w + IQ1_GROUP * k, scale, minus[k]);
        }
    }
    if (!off) return scale;
    float sumqx = 0.0f, sumq2 = 0.0f;
    for (int k = 0; k < n / IQ1_GROUP; ++k) {
        const i8* p = t.points + IQ1_GROUP * entry[k];
        for (int j = 0; j < IQ1_GROUP; ++j) {
            const float v = iq1_shifted(minus[k], (p[j] - 1) / 2);
            const float wv = w[IQ1_GROUP * k + j] * v;
            sumqx = sumqx + wv * x[IQ1_GROUP * k + j];
            sumq2 = sumq2 + wv * v;
        }
    }
    return sumqx > 0.0f && sumq2 > 0.0f ? sumqx / sumq2 : scale;
}

// The 3-bit scale l of a block scale under the super-block's d = max / 15.
QF_DEVICE i32 iq1_scale_bits(float scale, float id) {
    const i32 l = iq1_nearest_int(0.5f * (id * scale - 1.0f));
    return l < 0 ? 0 : l > 7 ? 7 : l;
}

// IQ1_S: 32-weight blocks, one delta sign each. A block whose largest |x| is below 1e-12 (or where no split
// scores) keeps scale 0, entries 0 and +delta. Bytes: fp16 d * 1.125, 32 low bytes of the entries, then per
// block a u16 of the entries' high bits, l << 12 and the sign << 15.
QF_DEVICE void iq1_s_block(const iq1_table& t, const float* x, const float* w, float* scale, bool* minus, i32* entry) {
    const int n = 32;
    int order[IQ1_MAX_BLOCK];
    iq1_sort(x, n, order);
    float sumx[IQ1_MAX_BLOCK + 1], sumw[IQ1_MAX_BLOCK + 1];
    sumx[0] = sumw[0] = 0.0f;
    for (int j = 0; j < n; ++j) {
        sumx[j + 1] = sumx[j] + w[order[j]] * x[order[j]];
        sumw[j + 1] = sumw[j] + w[order[j]];
    }
    float best = -IQ1_FLT_MAX, best_scale = 0.0f;
    int b1 = -1, b2 = -1;
    bool b_minus = false;
    for (int i1 = 0; i1 <= n; ++i1) {
        for (int i2 = i1; i2 <= n; ++i2) {
            for (int s = 0; s < 2; ++s) {  // +delta, then -delta; the sums from 0 are sumx[i1] less sumx[0] = 0
                const float v0 = iq1_shifted(s, 0), v1 = iq1_shifted(s, 1), v2 = iq1_shifted(s, 2);
                const float qx = sumx[i1] * v0 + (sumx[i2] - sumx[i1]) * v1 + (sumx[n] - sumx[i2]) * v2;
                const float q2 = sumw[i1] * v0 * v0 + (sumw[i2] - sumw[i1]) * v1 * v1 + (sumw[n] - sumw[i2]) * v2 * v2;
                if (iq1_offer(qx, q2, &best, &best_scale)) {
                    b1 = i1;
                    b2 = i2;
                    b_minus = s == 1;
                }
            }
        }
    }
    if (b1 < 0) return;
    const bool mirror = best_scale < 0.0f;  // a negative scale: mirror the levels and the delta
    u8 level[IQ1_MAX_BLOCK];
    iq1_levels(order, n, b1, b2, mirror, level);
    const bool sign[4] = {b_minus != mirror, b_minus != mirror, b_minus != mirror, b_minus != mirror};
    *scale = iq1_points(t, x, w, level, n, sign, fabsf(best_scale), entry);
    *minus = sign[0];
}

// xs: supers super-blocks, per_row to a row; importance: per_row * 256 values (llama.cpp asserts one for IQ1_S).
QF_KERNEL void iq1_s_search(const float* xs, const float* importance, i64 weighted, i64 supers, i64 per_row,
                            const i8* points, const i32* index, const i32* slot, const short* neighbours,
                            const i32* counts, i64 width, u8* out) {
    const iq1_table t = {points, index, slot, neighbours, counts, width};
    QF_FOR(s, supers) {
        const float* x = xs + IQ1_SUPER * s;
        u8* o = out + 50 * s;
        float w[IQ1_SUPER];
        iq1_weights(x, weighted ? importance + IQ1_SUPER * (s % per_row) : nullptr, w);
        float scales[8];
        bool minus[8];
        i32 entries[32];
        float top = 0.0f;
        for (int b = 0; b < 8; ++b) {
            scales[b] = 0.0f;
            minus[b] = false;
            for (int k = 0; k < 4; ++k) entries[4 * b + k] = 0;
            if (!iq1_below(x + 32 * b, 32, 1e-12f))
                iq1_s_block(t, x + 32 * b, w + 32 * b, &scales[b], &minus[b], entries + 4 * b);
            top = fmaxf(top, scales[b]);
        }
        const bool live = top != 0.0f;
        const float d = top / 15.0f;
        qf_put_f16(o, live ? d * 1.125f : 0.0f);
        for (int k = 0; k < 32; ++k) o[2 + k] = (u8)(entries[k] & 255);
        for (int b = 0; b < 8; ++b) {
            u32 qh = 0;
            for (int k = 0; k < 4; ++k) qh |= (u32)(entries[4 * b + k] >> 8) << (3 * k);
            if (live) qh |= (u32)iq1_scale_bits(scales[b], 1.0f / d) << 12 | (u32)minus[b] << 15;
            o[34 + 2 * b] = (u8)(qh & 255);
            o[35 + 2 * b] = (u8)(qh >> 8);
        }
    }
}

// IQ1_M: 16-weight blocks, a delta sign per group of 8. The split is scored under each pair of signs of the two
// halves (++, +-, -+, --) from prefix sums kept per half: with steps of -1 between levels, a half's sum is its total
// times the top level less the prefix sums at i1 and at i2.
QF_DEVICE void iq1_m_block(const iq1_table& t, const float* x, const float* w, float* scale, bool* minus, i32* entry) {
    const int n = 16;
    int order[IQ1_MAX_BLOCK];
    iq1_sort(x, n, order);
    float px[2][17], pw[2][17];
    px[0][0] = px[1][0] = pw[0][0] = pw[1][0] = 0.0f;
    for (int j = 0; j < n; ++j) {
        const int i = order[j];
        const int h = i < n / 2 ? 0 : 1;
        px[h][j + 1] = px[h][j] + w[i] * x[i];
        px[1 - h][j + 1] = px[1 - h][j];
        pw[h][j + 1] = pw[h][j] + w[i];
        pw[1 - h][j + 1] = pw[1 - h][j];
    }
    float top[2], lower[2], upper[2];  // per sign: the top level, the q^2 steps at i1 and at i2
    for (int s = 0; s < 2; ++s) {
        const float v0 = iq1_shifted(s, 0), v1 = iq1_shifted(s, 1), v2 = iq1_shifted(s, 2);
        top[s] = v2;
        lower[s] = v0 * v0 - v1 * v1;
        upper[s] = v1 * v1 - v2 * v2;
    }
    float best = -IQ1_FLT_MAX, best_scale = 0.0f;
    int b1 = -1, b2 = -1, bk = 0;
    for (int i1 = 0; i1 <= n; ++i1) {
        for (int i2 = i1; i2 <= n; ++i2) {
            float qx[2][2], q2[2][2];  // [half][sign]
            for (int h = 0; h < 2; ++h) {
                const float sx = px[h][i1] + px[h][i2];
                for (int s = 0; s < 2; ++s) {
                    qx[h][s] = px[h][n] * top[s] - sx;
                    q2[h][s] = pw[h][n] * top[s] * top[s] + pw[h][i1] * lower[s] + pw[h][i2] * upper[s];
                }
            }
            for (int k = 0; k < 4; ++k) {  // k = 2 * (first half's sign) + second half's
                if (iq1_offer(qx[0][k >> 1] + qx[1][k & 1], q2[0][k >> 1] + q2[1][k & 1], &best, &best_scale)) {
                    b1 = i1;
                    b2 = i2;
                    bk = k;
                }
            }
        }
    }
    if (b1 < 0) return;
    const bool mirror = best_scale < 0.0f;  // a negative scale: mirror the levels and both deltas
    u8 level[IQ1_MAX_BLOCK];
    iq1_levels(order, n, b1, b2, mirror, level);
    minus[0] = (bk >> 1) != (int)mirror;
    minus[1] = (bk & 1) != (int)mirror;
    *scale = iq1_points(t, x, w, level, n, minus, fabsf(best_scale), entry);
}

// As iq1_s_search; weighted 0 stands for llama.cpp's NULL importance (weights x^2).
QF_KERNEL void iq1_m_search(const float* xs, const float* importance, i64 weighted, i64 supers, i64 per_row,
                            const i8* points, const i32* index, const i32* slot, const short* neighbours,
                            const i32* counts, i64 width, u8* out) {
    const iq1_table t = {points, index, slot, neighbours, counts, width};
    QF_FOR(s, supers) {
        const float* x = xs + IQ1_SUPER * s;
        u8* o = out + 56 * s;
        float w[IQ1_SUPER];
        iq1_weights(x, weighted ? importance + IQ1_SUPER * (s % per_row) : nullptr, w);
        float scales[16];
        bool minus[32];
        i32 entries[32];
        float top = 0.0f;
        for (int b = 0; b < 16; ++b) {
            scales[b] = 0.0f;
            minus[2 * b] = minus[2 * b + 1] = false;
            entries[2 * b] = entries[2 * b + 1] = 0;
            if (!iq1_below(x + 16 * b, 16, 1e-7f))
                iq1_m_block(t, x + 16 * b, w + 16 * b, &scales[b], minus + 2 * b, entries + 2 * b);
            top = fmaxf(top, scales[b]);
        }
        const bool live = top != 0.0f;
        float d = top / 15.0f;
        i32 l[16];
        for (int b = 0; b < 16; ++b) l[b] = live ? iq1_scale_bits(scales[b], 1.0f / d) : 0;
        // The delta signs are written with the scales; d is refitted to the stored points times 2l + 1 over the
        // whole super-block, blocks left at scale 0 included (entry 0 under +delta).
        float sumqx = 0.0f, sumq2 = 0.0f;
        for (int g = 0; g < 32; ++g) {
            minus[g] = minus[g] && live;
            const i8* p = t.points + IQ1_GROUP * entries[g];
            for (int j = 0; j < IQ1_GROUP; ++j) {
                const float v = iq1_shifted(minus[g], (p[j] - 1) / 2) * (float)(2 * l[g / 2] + 1);
                const float wv = w[IQ1_GROUP * g + j] * v;
                sumqx = sumqx + wv * x[IQ1_GROUP * g + j];
                sumq2 = sumq2 + wv * v;
            }
        }
        if (sumq2 > 0.0f) d = sumqx / sumq2;
        const u32 bits = live ? qf_f32_to_f16(d * 1.1125f) : 0u;
        for (int k = 0; k < 32; ++k) o[k] = (u8)(entries[k] & 255);
        for (int b = 0; b < 16; ++b)
            o[32 + b] = (u8)((entries[2 * b] >> 8) | (entries[2 * b + 1] >> 8) << 4 | minus[2 * b] << 3
                             | minus[2 * b + 1] << 7);
        for (int q = 0; q < 4; ++q) {  // four 3-bit scales per u16, the fp16's nibble q on top
            u32 sc = ((bits >> (4 * q)) & 15u) << 12;
            for (int i = 0; i < 4; ++i) sc |= (u32)l[4 * q + i] << (3 * i);
            o[48 + 2 * q] = (u8)(sc & 255);
            o[49 + 2 * q] = (u8)(sc >> 8);
        }
    }
}
