// llama.cpp's IQ3_XXS and IQ3_S searches (quantize_row_iq3_xxs_impl, quantize_row_iq3_s_impl), one thread per
// 256-weight super-block, each writing its ggml bytes. The executable specification is tasks/quantize/iq3_grids.py
// (_IQ3Grid.search_reference): the same float32 operations in the same order (sums in element order, llama.cpp's
// nearest_int, the first candidate on a tie, no fused multiply-add), so the bytes equal the NumPy reference's and,
// through it, llama-quantize's.
//
// A group of 4 weights is one codebook point; its key packs the 4 levels (0..7), 3 bits each, first lowest. The
// codebook arrives as lattice.py's LatticeTable: points (entries x 4, coordinates 2 * level + 1), index (key ->
// entry or -1), slot (key -> its row of neighbours), neighbours (rows x width, nearest first) and counts per row.
#include "qf_cuda.h"

typedef short i16;  // LatticeTable.neighbours' entries (the shim names no 16-bit signed type)

#define QF_QK 256        // weights of a super-block
#define QF_BLOCK 32      // weights under one 4-bit scale
#define QF_GROUPS 8      // codebook points per block
#define QF_MAX_LEVEL 7
#define QF_XXS_BYTES 98  // block_iq3_xxs: d, qs[64], 8 words of 7-bit signs x 4 and a 4-bit scale
#define QF_S_BYTES 110   // block_iq3_s: d, qs[64], qh[8], signs[32], scales[4]

struct qf_lattice {
    const i8* points;
    const i32* index;
    const i32* slot;
    const i16* neighbours;
    const i32* counts;
    i64 width;
};

// What the two types choose differently (the _IQ3Grid subclasses' attributes).
struct qf_iq3_kind {
    bool xxs;            // IQ3_XXS: 7 stored signs per 8 (an even count of negatives), and it redoes only off-grid
                         // groups; IQ3_S stores all 8 signs and redoes every group of the block
    int trials;          // scales tried either side of the block maximum's: 15 or 9
    float fudge;         // the super-block scale is stored as fp16(max_scale / 31 * fudge)
};

// The search's answer for one 32-block.
struct qf_iq3_block {
    bool skip;           // left all-zero: no index, sign or scale written
    float scale;
    i32 index[QF_GROUPS];
    u8 signs[4];         // negative flags, a byte per 8 weights, first weight lowest
};

// llama.cpp's nearest_int (1.5 * 2^23 added, the mantissa read back): round half to even in its range, and the
// same integer as llama.cpp's outside it.
QF_DEVICE i32 qf_nearest_int(float x) {
    const float shifted = x + 12582912.0f;
    return (i32)(qf_float_bits(shifted) & 0x007FFFFFu) - 0x00400000;
}

QF_DEVICE i32 qf_clamp(i32 v, i32 lo, i32 hi) { return v < lo ? lo : v > hi ? hi : v; }

// The level nearest |x| at the inverse scale: round((inverse * |x| - 1) / 2) within 0..7.
QF_DEVICE i8 qf_level(float xval, float inverse) {
    return (i8)qf_clamp(qf_nearest_int(0.5f * (inverse * xval - 1.0f)), 0, QF_MAX_LEVEL);
}

QF_DEVICE i32 qf_key(const i8* level) {
    return (i32)level[0] | ((i32)level[1] << 3) | ((i32)level[2] << 6) | ((i32)level[3] << 9);
}

// Whether a group's 4 levels are a codebook point; where not, they are replaced by those of the neighbour
// minimizing sum w * (scale * point - x)^2 (coordinates in order, the first on a tie), iq3_find_best_neighbour.
QF_DEVICE bool qf_snap(const qf_lattice& t, i8* level, const float* xval, const float* wsq, float scale) {
    const i32 key = qf_key(level);
    if (t.index[key] >= 0) return true;
    const i32 row = t.slot[key];
    const i16* cand = t.neighbours + t.width * row;
    i32 chosen = cand[0];
    float best = 0.0f;
    for (i32 j = 0; j < t.counts[row]; ++j) {
        const i8* p = t.points + 4 * (i32)cand[j];
        float d2 = 0.0f;
        for (int i = 0; i < 4; ++i) {
            const float diff = scale * (float)p[i] - xval[i];
            d2 = d2 + wsq[i] * diff * diff;
        }
        if (j == 0 || d2 < best) {
            best = d2;
            chosen = cand[j];
        }
    }
    for (int i = 0; i < 4; ++i) level[i] = (i8)((t.points[4 * chosen + i] - 1) / 2);
    return false;
}

// sum w * |x| * q and sum w * q * q over the block, q = 2 * level + 1, in element order.
QF_DEVICE void qf_fit(const float* weight, const float* xval, const i8* level, float* sumqx, float* sumq2) {
    float qx = 0.0f, q2 = 0.0f;
    for (int i = 0; i < QF_BLOCK; ++i) {
        const float q = 2.0f * (float)level[i] + 1.0f;
        qx = qx + weight[i] * xval[i] * q;
        q2 = q2 + weight[i] * q * q;
    }
    *sumqx = qx;
    *sumq2 = q2;
}

// One 32-block x under its weights: the impl's per-block loop.
QF_DEVICE void qf_search_block(const qf_lattice& t, const qf_iq3_kind& kind, const float* x, const float* weight,
                               qf_iq3_block* out) {
    float xval[QF_BLOCK], wsq[QF_BLOCK];
    for (int k = 0; k < 4; ++k) {
        u8 s = 0;
        int negatives = 0;
        for (int i = 0; i < 8; ++i) {
            const int j = 8 * k + i;
            const bool negative = x[j] < 0.0f;
            xval[j] = negative ? -x[j] : x[j];
            if (negative) {
                s |= (u8)(1u << i);
                ++negatives;
            }
        }
        if (kind.xxs && negatives % 2) {
            // only 7 signs are stored, so the count must be even: the weight of least w * x^2 (the first on a tie)
            // flips, and its |x| turns negative so that the search pays for the flip
            int cheapest = 0;
            float least = weight[8 * k] * x[8 * k] * x[8 * k];
            for (int i = 1; i < 8; ++i) {
                const float cost = weight[8 * k + i] * x[8 * k + i] * x[8 * k + i];
                if (cost < least) {
                    least = cost;
                    cheapest = i;
                }
            }
            xval[8 * k + cheapest] = -xval[8 * k + cheapest];
            s ^= (u8)(1u << cheapest);
        }
        out->signs[k] = s;
    }
    float top = xval[0];
    for (int i = 1; i < QF_BLOCK; ++i)
        if (xval[i] > top) top = xval[i];
    out->skip = kind.xxs ? top < 1e-8f : top == 0.0f;
    if (out->skip) {
        out->scale = 0.0f;
        return;
    }
    for (int i = 0; i < QF_BLOCK; ++i) wsq[i] = sqrtf(weight[i]);

    i8 level[QF_BLOCK], trial[QF_BLOCK];
    bool on[QF_GROUPS], trial_on[QF_GROUPS];
    for (int i = 0; i < QF_BLOCK; ++i) level[i] = 0;
    // IQ3_XXS counts a block that no trial improved as on the grid (no final pass); IQ3_S as off it
    for (int g = 0; g < QF_GROUPS; ++g) on[g] = kind.xxs;
    float scale = top / 15.0f;
    float best = 0.0f;
    for (int step = -kind.trials; step <= kind.trials; ++step) {
        const float inverse = (15.0f + (float)step * 0.2f) / top;
        const float trial_scale = 1.0f / inverse;
        for (int i = 0; i < QF_BLOCK; ++i) trial[i] = qf_level(xval[i], inverse);
        for (int g = 0; g < QF_GROUPS; ++g)
            trial_on[g] = qf_snap(t, trial + 4 * g, xval + 4 * g, wsq + 4 * g, trial_scale);
        float sumqx, sumq2;
        qf_fit(weight, xval, trial, &sumqx, &sumq2);
        if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            for (int i = 0; i < QF_BLOCK; ++i) level[i] = trial[i];
            for (int g = 0; g < QF_GROUPS; ++g) on[g] = trial_on[g];
        }
    }
    bool all_on = true;
    for (int g = 0; g < QF_GROUPS; ++g) all_on = all_on && on[g];
    if (!all_on && scale > 0.0f) {  // search groups again at the best scale, then refit it
        const float inverse = 1.0f / scale;
        for (int g = 0; g < QF_GROUPS; ++g) {
            if (kind.xxs && on[g]) continue;
            for (int i = 4 * g; i < 4 * g + 4; ++i) level[i] = qf_level(xval[i], inverse);
            qf_snap(t, level + 4 * g, xval + 4 * g, wsq + 4 * g, scale);
        }
        float sumqx, sumq2;
        qf_fit(weight, xval, level, &sumqx, &sumq2);
        if (sumq2 > 0.0f) scale = sumqx / sumq2;
    }
    if (scale < 0.0f) {  // llama.cpp's guard: a positive scale, every sign turned
        scale = -scale;
        for (int k = 0; k < 4; ++k) out->signs[k] = (u8)~out->signs[k];
    }
    out->scale = scale;
    for (int g = 0; g < QF_GROUPS; ++g) out->index[g] = t.index[qf_key(level + 4 * g)];
}

// Super-block b of x (rows of cols weights): its 8 blocks searched, then packed into o.
QF_DEVICE void qf_iq3_super(const qf_lattice& t, const qf_iq3_kind& kind, const float* xs, const float* importance,
                            bool weighted, i64 cols, i64 b, u8* o) {
    const float* xbl = xs + QF_QK * b;
    const float* qw = weighted ? importance + QF_QK * (b % (cols / QF_QK)) : importance;  // a row's columns
    float sumx2 = 0.0f;
    for (int i = 0; i < QF_QK; ++i) sumx2 = sumx2 + xbl[i] * xbl[i];
    const float sigma2 = 2.0f * sumx2 / 256.0f;

    qf_iq3_block blocks[QF_QK / QF_BLOCK];
    float top = 0.0f;
    for (int ib = 0; ib < QF_QK / QF_BLOCK; ++ib) {
        const float* x = xbl + QF_BLOCK * ib;
        float weight[QF_BLOCK];
        for (int i = 0; i < QF_BLOCK; ++i)
            weight[i] = weighted ? qw[QF_BLOCK * ib + i] * sqrtf(sigma2 + x[i] * x[i]) : x[i] * x[i];
        qf_search_block(t, kind, x, weight, &blocks[ib]);
        if (blocks[ib].scale > top) top = blocks[ib].scale;
    }

    const int size = kind.xxs ? QF_XXS_BYTES : QF_S_BYTES;
    for (int i = 0; i < size; ++i) o[i] = 0;
    const bool live = top > 0.0f;
    const float d = top / 31.0f;
    const float inverse = 1.0f / (live ? d : 1.0f);
    u8 nibble[QF_QK / QF_BLOCK];
    for (int ib = 0; ib < QF_QK / QF_BLOCK; ++ib)
        nibble[ib] = (u8)qf_clamp(qf_nearest_int(0.5f * (inverse * blocks[ib].scale - 1.0f)), 0, 15);
    if (live) qf_put_f16(o, d * kind.fudge);

    if (kind.xxs) {
        if (!live) return;  // llama.cpp clears the whole super-block
        u8* qs = o + 2;
        u8* words = o + 2 + QF_QK / 4;
        for (int ib = 0; ib < QF_QK / QF_BLOCK; ++ib) {
            const qf_iq3_block& blk = blocks[ib];
            u32 word = (u32)nibble[ib] << 28;
            if (!blk.skip) {
                for (int g = 0; g < QF_GROUPS; ++g) qs[QF_GROUPS * ib + g] = (u8)blk.index[g];
                for (int k = 0; k < 4; ++k) word |= (u32)(blk.signs[k] & 127u) << (7 * k);
            }
            for (int k = 0; k < 4; ++k) words[4 * ib + k] = (u8)(word >> (8 * k));
        }
        return;
    }

    // IQ3_S: llama.cpp advances its index and sign cursors only past a block it searched, so a skipped block
    // shifts the later blocks' low index bytes and signs one block earlier; the 9th index bits stay in place.
    u8* qs = o + 2;
    u8* qh = o + 2 + QF_QK / 4;
    u8* signs = qh + QF_QK / 32;
    u8* scales = signs + QF_QK / 8;
    int cursor = 0;
    for (int ib = 0; ib < QF_QK / QF_BLOCK; ++ib) {
        const qf_iq3_block& blk = blocks[ib];
        if (blk.skip) continue;
        for (int g = 0; g < QF_GROUPS; ++g) {
            qs[QF_GROUPS * cursor + g] = (u8)(blk.index[g] & 255);
            qh[ib] |= (u8)((blk.index[g] >> 8) << g);
        }
        for (int k = 0; k < 4; ++k) signs[4 * cursor + k] = blk.signs[k];
        ++cursor;
    }
    if (live)
        for (int j = 0; j < QF_QK / QF_BLOCK / 2; ++j) scales[j] = (u8)(nibble[2 * j] | (nibble[2 * j + 1] << 4));
}

// One thread per super-block of x (rows x cols float32, cols a multiple of 256, supers = rows * cols / 256);
// importance: cols floats when weighted, else unread. out: supers x 98 (IQ3_XXS) or x 110 (IQ3_S) bytes.
QF_KERNEL void iq3_xxs_search(const float* x, const float* importance, i64 weighted, i64 supers, i64 cols,
                              const i8* points, const i32* index, const i32* slot, const i16* neighbours,
                              const i32* counts, i64 width, u8* out) {
    const qf_lattice t = {points, index, slot, neighbours, counts, width};
    const qf_iq3_kind kind = {true, 15, 1.0125f};
    QF_FOR(b, supers) qf_iq3_super(t, kind, x, importance, weighted != 0, cols, b, out + QF_XXS_BYTES * b);
}

QF_KERNEL void iq3_s_search(const float* x, const float* importance, i64 weighted, i64 supers, i64 cols,
                            const i8* points, const i32* index, const i32* slot, const i16* neighbours,
                            const i32* counts, i64 width, u8* out) {
    const qf_lattice t = {points, index, slot, neighbours, counts, width};
    const qf_iq3_kind kind = {false, 9, 1.033f};
    QF_FOR(b, supers) qf_iq3_super(t, kind, x, importance, weighted != 0, cols, b, out + QF_S_BYTES * b);
}
