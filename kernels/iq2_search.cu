// llama.cpp's 2-bit lattice searches (quantize_row_iq2_xxs_impl, quantize_row_iq2_xs_impl, quantize_row_iq2_s_impl),
// one thread per 256-weight super-block, writing its ggml bytes. The executable specification is
// tasks/quantize/iq2_grids.py (IQ2Grid.search_reference and its subclasses): the same float32 operations in the
// same order (sums in element order, llama.cpp's nearest_int, no fused multiply-add, the first on a tie), so the
// bytes equal the NumPy reference's, and through it llama-quantize's.
//
// The codebook comes as LatticeTable's arrays: points (entries x 8 coordinates 2 * level + 1), index (key -> entry,
// -1 off the codebook), slot (key -> its neighbour list) and the lists flattened, list s being
// neighbours[starts[s] .. starts[s + 1]), nearest first.
#include "qf_cuda.h"

#define IQ2_SUPER 256
#define IQ2_GROUP 8
#define IQ2_MAX_BLOCK 32  // weights per sub-block: 32 for IQ2_XXS, 16 for the others
#define IQ2_GROUPS (IQ2_SUPER / IQ2_GROUP)

// What the three types do differently (IQ2Grid's class attributes).
struct iq2_kind {
    int block;             // weights per sub-block scale
    int trials;            // trial scales (5 + t / 10) / reach for t in -trials..trials
    bool positive_start;   // IQ2_XXS: start from make_qp_quants' scale, not the largest magnitude's fifth
    bool refit_all;        // re-round every group at the kept scale, not only those off the codebook
    bool seven_signs;      // 7 sign bits stored per group, the eighth from their parity
    float sigma2_factor;   // the weights qw * sqrt(sigma2 + x^2) take sigma2 = factor * (sum of x^2) / 256
    float group_max_eps;   // a sub-block whose magnitudes all fall below it stays zero
    bool clears_empty;     // a super-block whose scales are all 0 stores no entries and signs
    float d_factor;        // the stored fp16 d is d_factor * largest scale / 31
};

enum { IQ2_XXS, IQ2_XS, IQ2_S };

QF_DEVICE iq2_kind iq2_kind_of(i64 type) {
    //                  block trials positive_start refit_all seven_signs sigma2 group_max_eps clears_empty d_factor
    const iq2_kind xxs = {32, 6, true, true, true, 1.0f, 1e-15f, true, 1.0f};
    const iq2_kind xs = {16, 9, false, false, true, 1.0f, 1e-15f, true, 1.0f};
    const iq2_kind s = {16, 9, false, false, false, 2.0f, 1e-8f, false, 0.9875f};
    return type == IQ2_XXS ? xxs : type == IQ2_XS ? xs : s;
}

struct iq2_table {
    const i8* points;
    const i32* index;
    const i32* slot;
    const i32* starts;
    const u16* neighbours;
};

// llama.cpp's nearest_int: the 1.5 * 2^23 trick, half to even within +-4194303 and the same integer beyond.
QF_DEVICE i32 iq2_nearest_int(float x) {
    const float shifted = x + 12582912.0f;
    return (i32)(qf_float_bits(shifted) & 0x007FFFFFu) - 0x00400000;
}

QF_DEVICE i32 iq2_level(float inverse, float x, i32 top) {
    const i32 l = iq2_nearest_int(0.5f * (inverse * x - 1.0f));
    return l < 0 ? 0 : l > top ? top : l;
}

// make_qp_quants(n, nmax, x, L, w) as kquants.search_positive_scale_reference ports it; only its scale is used.
// L is llama.cpp's uint8_t: a negative integer (the magnitude a folded sign left negative) wraps modulo 256 where
// it is stored and read back, while the sums take the integer itself.
QF_DEVICE float iq2_positive_scale(const float* x, const float* w, int n, i32 nmax) {
    float top = 0.0f;
    for (int i = 0; i < n; ++i) top = top > x[i] ? top : x[i];
    if (top < 1e-15f) return 0.0f;
    float iscale = (float)nmax / top;
    u8 L[IQ2_MAX_BLOCK];
    float scale = 1.0f / iscale;
    float best = 0.0f;
    for (int i = 0; i < n; ++i) {
        const u8 l = (u8)iq2_nearest_int(iscale * x[i]);  // unclamped, wrapped, as llama.cpp's first pass
        const float diff = x[i] - scale * (float)l;
        best = best + w[i] * diff * diff;
    }
    for (int step = -4; step <= 4; ++step) {
        if (step == 0) continue;
        const float trial = (0.1f * (float)step + (float)nmax) / top;
        const float trial_scale = 1.0f / trial;
        float error = 0.0f;
        for (int i = 0; i < n; ++i) {
            i32 l = iq2_nearest_int(trial * x[i]);
            l = l < nmax ? l : nmax;
            const float diff = x[i] - trial_scale * (float)l;
            error = error + w[i] * diff * diff;
        }
        if (error < best) {
            best = error;
            iscale = trial;
        }
    }
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; ++i) {
        i32 l = iq2_nearest_int(iscale * x[i]);
        l = l < nmax ? l : nmax;
        L[i] = (u8)l;
        sumlx = sumlx + w[i] * x[i] * (float)l;
        suml2 = suml2 + w[i] * (float)l * (float)l;
    }
    for (int round = 0; round < 5; ++round) {
        bool changed = false;
        for (int i = 0; i < n; ++i) {
            const float li = (float)L[i];
            float slx = sumlx - w[i] * x[i] * li;
            float sl2 = suml2 - w[i] * li * li;
            if (!(slx > 0.0f && sl2 > 0.0f)) continue;
            i32 l = iq2_nearest_int(x[i] * sl2 / slx);
            l = l < nmax ? l : nmax;
            if (l == (i32)L[i]) continue;
            slx = slx + w[i] * x[i] * (float)l;
            sl2 = sl2 + w[i] * (float)l * (float)l;
            if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                L[i] = (u8)l;
                sumlx = slx;
                suml2 = sl2;
                changed = true;
            }
        }
        if (!changed) break;  // a round that changes nothing: every later round would change nothing either
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// The entry of one group of 8 magnitudes at one scale: its levels rounded against ``inverse`` and clamped to 0..2
// (level 3 comes only from a neighbour), their own entry where the key is on the codebook, else the neighbour
// minimizing sum waux * (scale * point - x)^2, the first on a tie. *on says whether the key was on the codebook.
QF_DEVICE i32 iq2_assign(const iq2_table* t, const float* x, const float* waux, float inverse, float scale, bool* on) {
    i32 key = 0;
    for (int i = 0; i < IQ2_GROUP; ++i) key |= iq2_level(inverse, x[i], 2) << (2 * i);
    const i32 entry = t->index[key];
    *on = entry >= 0;
    if (entry >= 0) return entry;
    const i32 s = t->slot[key];
    i32 best_entry = -1;
    float best = 0.0f;
    for (i32 j = t->starts[s]; j < t->starts[s + 1]; ++j) {
        const i32 e = t->neighbours[j];
        const i8* p = t->points + IQ2_GROUP * e;
        float d2 = 0.0f;
        for (int i = 0; i < IQ2_GROUP; ++i) {
            const float diff = scale * (float)p[i] - x[i];
            d2 = d2 + waux[i] * diff * diff;
        }
        if (best_entry < 0 || d2 < best) {
            best = d2;
            best_entry = e;
        }
    }
    return best_entry;
}

// sum w x q and sum w q q over a sub-block, in element order, q the entries' coordinates.
QF_DEVICE void iq2_fit(const iq2_table* t, const float* x, const float* w, const i32* entries, int n, float* sumqx,
                       float* sumq2) {
    float qx = 0.0f, q2 = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float q = (float)t->points[IQ2_GROUP * entries[i / IQ2_GROUP] + i % IQ2_GROUP];
        qx = qx + w[i] * x[i] * q;
        q2 = q2 + w[i] * q * q;
    }
    *sumqx = qx;
    *sumq2 = q2;
}

// One sub-block: its signed scale (0 where it stays zero), its groups' entries and sign bytes (bit i set where weight
// i is stored negative, flipped where the scale comes out negative). Returns whether its fields are written.
QF_DEVICE bool iq2_sub_block(const iq2_kind* k, const iq2_table* t, const float* xb, const float* weight,
                             float* scale_out, i32* entries, u8* signs) {
    const int n = k->block, groups = k->block / IQ2_GROUP;
    float xval[IQ2_MAX_BLOCK], waux[IQ2_MAX_BLOCK];
    for (int i = 0; i < n; ++i) waux[i] = sqrtf(weight[i]);
    for (int g = 0; g < groups; ++g) {
        const float* x = xb + IQ2_GROUP * g;
        u8 s = 0;
        int negatives = 0;
        for (int i = 0; i < IQ2_GROUP; ++i) {
            const bool negative = !(x[i] >= 0.0f);
            xval[IQ2_GROUP * g + i] = negative ? -x[i] : x[i];
            if (negative) { s |= (u8)(1u << i); ++negatives; }
        }
        if (k->seven_signs && negatives % 2) {
            // only 7 bits are stored: the weight of least weight * x^2 keeps its sign, its magnitude goes in negative
            const float* w = weight + IQ2_GROUP * g;
            int least = 0;
            float cost = w[0] * x[0] * x[0];
            for (int i = 1; i < IQ2_GROUP; ++i) {
                const float c = w[i] * x[i] * x[i];
                if (c < cost) { cost = c; least = i; }
            }
            xval[IQ2_GROUP * g + least] = -xval[IQ2_GROUP * g + least];
            s ^= (u8)(1u << least);
        }
        signs[g] = s;
    }
    float top = xval[0];
    for (int i = 1; i < n; ++i) top = top > xval[i] ? top : xval[i];
    *scale_out = 0.0f;
    if (top < k->group_max_eps) return false;
    float scale, reach;
    if (k->positive_start) {
        scale = iq2_positive_scale(xval, weight, n, 4);
        reach = scale * 3.0f;  // kMaxQ = 3
        if (reach <= 0.0f) return false;
    } else {
        scale = top / 5.0f;  // 2 * kMaxQ - 1
        reach = top;
    }
    bool on[IQ2_MAX_BLOCK / IQ2_GROUP], trial_on[IQ2_MAX_BLOCK / IQ2_GROUP];
    i32 trial[IQ2_MAX_BLOCK / IQ2_GROUP];
    for (int g = 0; g < groups; ++g) {
        entries[g] = t->index[0];  // levels 0: kept where no trial improves on the start
        on[g] = true;
    }
    float best = 0.0f;
    for (int step = -k->trials; step <= k->trials; ++step) {
        const float inverse = (5.0f + (float)step * 0.1f) / reach;
        const float trial_scale = 1.0f / inverse;
        for (int g = 0; g < groups; ++g)
            trial[g] = iq2_assign(t, xval + IQ2_GROUP * g, waux + IQ2_GROUP * g, inverse, trial_scale, &trial_on[g]);
        float sumqx, sumq2;
        iq2_fit(t, xval, weight, trial, n, &sumqx, &sumq2);
        if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            for (int g = 0; g < groups; ++g) {
                entries[g] = trial[g];
                on[g] = trial_on[g];
            }
        }
    }
    bool redo = k->refit_all;
    for (int g = 0; g < groups; ++g) redo = redo || !on[g];
    if (redo && scale > 0.0f) {
        const float inverse = 1.0f / scale;
        for (int g = 0; g < groups; ++g) {
            bool on_codebook;  // not asked again: the refit below takes every group's point alike
            if (k->refit_all || !on[g])
                entries[g] = iq2_assign(t, xval + IQ2_GROUP * g, waux + IQ2_GROUP * g, inverse, scale, &on_codebook);
        }
        float sumqx, sumq2;
        iq2_fit(t, xval, weight, entries, n, &sumqx, &sumq2);
        if (sumq2 > 0.0f) scale = sumqx / sumq2;
    }
    if (scale < 0.0f) {  // a positive scale is stored: the flipped signs carry the sign
        scale = -scale;
        for (int g = 0; g < groups; ++g) signs[g] = (u8)~signs[g];
    }
    *scale_out = scale;
    return true;
}

// ggml's block_iq2_xxs / block_iq2_xs / block_iq2_s after the fp16 d: per group an entry and a sign byte, per
// sub-block a 4-bit scale.
QF_DEVICE void iq2_pack(const iq2_kind* k, u8* o, const i32* entries, const u8* signs, const i32* levels) {
    if (k->block == 32) {  // IQ2_XXS: per 32 weights a u32 of 4 entry bytes, a u32 of 4 x 7 sign bits and the scale
        for (int b = 0; b < IQ2_SUPER / 32; ++b) {
            u32 upper = (u32)levels[b] << 28;
            for (int g = 0; g < 4; ++g) {
                o[8 * b + g] = (u8)entries[4 * b + g];
                upper |= (u32)(signs[4 * b + g] & 127u) << (7 * g);
            }
            for (int j = 0; j < 4; ++j) o[8 * b + 4 + j] = (u8)(upper >> (8 * j));
        }
        return;
    }
    if (k->seven_signs) {  // IQ2_XS: per group a u16 of 9 entry bits and 7 sign bits
        for (int g = 0; g < IQ2_GROUPS; ++g) {
            const u32 word = (u32)entries[g] | ((u32)(signs[g] & 127u) << 9);
            o[2 * g] = (u8)word;
            o[2 * g + 1] = (u8)(word >> 8);
        }
        o += 2 * IQ2_GROUPS;
    } else {  // IQ2_S: entries' low bytes, sign bytes, entries' top 2 bits four per byte
        for (int g = 0; g < IQ2_GROUPS; ++g) {
            o[g] = (u8)entries[g];
            o[IQ2_GROUPS + g] = signs[g];
        }
        for (int j = 0; j < IQ2_GROUPS / 4; ++j) {
            u32 high = 0;
            for (int g = 0; g < 4; ++g) high |= (u32)(entries[4 * j + g] >> 8) << (2 * g);
            o[2 * IQ2_GROUPS + j] = (u8)high;
        }
        o += 2 * IQ2_GROUPS + IQ2_GROUPS / 4;
    }
    for (int b = 0; b < IQ2_SUPER / 32; ++b)  // then both: the 16 sub-block scales, two per byte
        o[b] = (u8)(levels[2 * b] | (levels[2 * b + 1] << 4));
}

// Super-block b of x (per_row of them per row; importance has a row's length, or is absent for IQ2_S):
// its type_size bytes at out + type_size * b.
QF_DEVICE void iq2_super_block(const iq2_kind* k, const iq2_table* t, const float* xs, const float* importance,
                               i64 per_row, i64 type_size, u8* out, i64 b) {
    const float* xbl = xs + IQ2_SUPER * b;
    const float* qw = importance ? importance + IQ2_SUPER * (b % per_row) : 0;
    float sumx2 = 0.0f;
    for (int i = 0; i < IQ2_SUPER; ++i) sumx2 = sumx2 + xbl[i] * xbl[i];
    const float sigma2 = k->sigma2_factor * sumx2 / (float)IQ2_SUPER;
    const int blocks = IQ2_SUPER / k->block, groups = k->block / IQ2_GROUP;
    float scales[IQ2_SUPER / 16];
    i32 entries[IQ2_GROUPS], levels[IQ2_SUPER / 16];
    u8 signs[IQ2_GROUPS];
    bool written[IQ2_SUPER / 16];
    float top = 0.0f;
    for (int ib = 0; ib < blocks; ++ib) {
        const float* xb = xbl + k->block * ib;
        float weight[IQ2_MAX_BLOCK];
        for (int i = 0; i < k->block; ++i)
            weight[i] = qw ? qw[k->block * ib + i] * sqrtf(sigma2 + xb[i] * xb[i]) : 0.25f * sigma2 + xb[i] * xb[i];
        written[ib] = iq2_sub_block(k, t, xb, weight, &scales[ib], entries + groups * ib, signs + groups * ib);
        top = top > scales[ib] ? top : scales[ib];
    }
    const bool kept = top != 0.0f;
    const float d = top / 31.0f;
    const float inverse = 1.0f / (kept ? d : 1.0f);
    for (int ib = 0; ib < blocks; ++ib) {
        levels[ib] = kept ? iq2_level(inverse, scales[ib], 15) : 0;
        if (!written[ib] || (k->clears_empty && !kept)) {  // llama.cpp leaves such fields zero
            for (int g = 0; g < groups; ++g) {
                entries[groups * ib + g] = 0;
                signs[groups * ib + g] = 0;
            }
        }
    }
    u8* o = out + type_size * b;
    qf_put_f16(o, d * k->d_factor);
    iq2_pack(k, o + 2, entries, signs, levels);
}

// One thread per super-block; type: IQ2_XXS, IQ2_XS or IQ2_S (the enum's order); importance: ignored where
// has_importance is 0 (IQ2_S alone runs without one).
QF_KERNEL void iq2_search(const float* xs, const float* importance, i64 has_importance, i64 type, i64 super_blocks,
                          i64 per_row, i64 type_size, const i8* points, const i32* index, const i32* slot,
                          const i32* starts, const u16* neighbours, u8* out) {
    const iq2_kind k = iq2_kind_of(type);
    const iq2_table t = {points, index, slot, starts, neighbours};
    QF_FOR(b, super_blocks) iq2_super_block(&k, &t, xs, has_importance ? importance : 0, per_row, type_size, out, b);
}
