// The K-quant scale searches of llama.cpp's quantize_row_q*_K_ref and *_impl, one thread per sub-block:
// make_qkx2_quants and make_qkx3_quants (a scale and a min per sub-block: Q2_K, Q4_K, Q5_K, and Q4_1/Q5_1 under an
// importance matrix) and make_qx_quants with rmse_type 1 (Q6_K; Q3_K, Q4_0, Q5_0 under an importance matrix). The
// executable specification is tasks/quantize/kquants.py (search_min_scale, search_signed_scale): the same
// float32 operations in the same order (sums in element order, round half to even, no fused multiply-add),
// so the codes and scales equal the NumPy reference's bit for bit, and through it llama-quantize's bytes.
#include "qf_cuda.h"

QF_DEVICE float qf_safe(float x) { return x == 0.0f ? 1.0f : x; }
QF_DEVICE float qf_clamp_rint(float v, float lo, float hi) {
    const float r = rintf(v);  // half to even, as NumPy's rint and llama.cpp's nearest_int
    return r < lo ? lo : r > hi ? hi : r;
}

// sum of w * (|s q + m - x| or (s q + m - x)^2), in element order
QF_DEVICE float qf_fit_error(const float* x, const float* w, const u8* q, i64 n, float s, float m, bool mad) {
    float total = 0.0f;
    for (i64 i = 0; i < n; ++i) {
        const float diff = s * (float)q[i] + m - x[i];
        total = total + w[i] * (mad ? fabsf(diff) : diff * diff);
    }
    return total;
}

// Row r of x and w (n elements each): its scale, its min as a positive offset, and codes in [0, nmax].
// aux: n bytes of scratch per row.
QF_KERNEL void search_min_scale(const float* xs, const float* ws, i64 rows, i64 n, i64 nmax_i, float rmin,
                                float rdelta, i64 nstep, i64 use_mad, float* scale_out, float* min_out, u8* codes,
                                u8* auxs) {
    QF_FOR(r, rows) {
        const float* x = xs + n * r;
        const float* w = ws + n * r;
        u8* q = codes + n * r;
        u8* aux = auxs + n * r;
        const float nmax = (float)nmax_i;
        const bool mad = use_mad != 0;
        float sum_w = w[0];
        float sum_x = sum_w * x[0];
        float lo = x[0], hi = x[0];
        for (i64 i = 1; i < n; ++i) {
            sum_w = sum_w + w[i];
            sum_x = sum_x + w[i] * x[i];
            if (x[i] < lo) lo = x[i];
            if (x[i] > hi) hi = x[i];
        }
        if (lo > 0.0f) lo = 0.0f;
        const bool flat = hi == lo;
        float iscale = nmax / qf_safe(hi - lo);
        float scale = 1.0f / iscale;
        for (i64 i = 0; i < n; ++i) q[i] = (u8)qf_clamp_rint(iscale * (x[i] - lo), 0.0f, nmax);
        float best = qf_fit_error(x, w, q, n, scale, lo, mad);
        for (i64 step = 0; step <= nstep; ++step) {
            iscale = (rmin + rdelta * (float)step + nmax) / qf_safe(hi - lo);
            float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
            for (i64 i = 0; i < n; ++i) {
                const float l = qf_clamp_rint(iscale * (x[i] - lo), 0.0f, nmax);
                aux[i] = (u8)l;
                sum_l = sum_l + w[i] * l;
                sum_l2 = sum_l2 + w[i] * l * l;
                sum_xl = sum_xl + w[i] * l * x[i];
            }
            const float det = sum_w * sum_l2 - sum_l * sum_l;
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / qf_safe(det);
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / qf_safe(det);
            if (this_min > 0.0f) {
                this_scale = sum_xl / qf_safe(sum_l2);
                this_min = 0.0f;
            }
            const float current = qf_fit_error(x, w, aux, n, this_scale, this_min, mad);
            if (det > 0.0f && current < best) {
                for (i64 i = 0; i < n; ++i) q[i] = aux[i];
                best = current;
                scale = this_scale;
                lo = this_min;
            }
        }
        if (flat) {
            for (i64 i = 0; i < n; ++i) q[i] = 0;
            scale = 0.0f;
        }
        scale_out[r] = scale;
        min_out[r] = -lo;
    }
}

// sum w x l and sum w l l in element order; l = clip(rint(iscale x), -nmax, nmax - 1), kept in aux
QF_DEVICE void qf_signed_trial(const float* x, const float* w_, i64 n, float iscale, float nmax, u8* aux, float* sumlx,
                               float* suml2) {
    float lx = 0.0f, l2 = 0.0f;
    for (i64 i = 0; i < n; ++i) {
        const float l = qf_clamp_rint(iscale * x[i], -nmax, nmax - 1.0f);
        aux[i] = (u8)(i32)(l + nmax);
        const float w = w_[i];
        lx = lx + w * x[i] * l;
        l2 = l2 + w * l * l;
    }
    *sumlx = lx;
    *suml2 = l2;
}

// Row r of x, fitted with weights w (llama.cpp's x * x without an importance matrix): its scale and codes in
// [0, 2 nmax) (the signed code plus nmax). aux: n bytes of scratch per row.
QF_KERNEL void search_signed_scale(const float* xs, const float* ws, i64 rows, i64 n, i64 nmax_i, float* scale_out,
                                   u8* codes, u8* auxs) {
    QF_FOR(r, rows) {
        const float* x = xs + n * r;
        const float* w = ws + n * r;
        u8* q = codes + n * r;
        u8* aux = auxs + n * r;
        const float nmax = (float)nmax_i;
        float extreme = x[0];
        for (i64 i = 1; i < n; ++i)
            if (fabsf(x[i]) > fabsf(extreme)) extreme = x[i];  // the first of equal magnitudes
        const bool zero = fabsf(extreme) < 1e-15f;
        extreme = qf_safe(extreme);
        float sumlx, suml2;
        qf_signed_trial(x, w, n, -nmax / extreme, nmax, q, &sumlx, &suml2);
        float scale = suml2 != 0.0f ? sumlx / qf_safe(suml2) : 0.0f;
        float best = scale * sumlx;
        for (i64 step = -9; step <= 9; ++step) {
            if (step == 0) continue;
            qf_signed_trial(x, w, n, -(nmax + 0.1f * (float)step) / extreme, nmax, aux, &sumlx, &suml2);
            if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
                for (i64 i = 0; i < n; ++i) q[i] = aux[i];
                scale = sumlx / qf_safe(suml2);
                best = scale * sumlx;
            }
        }
        if (zero) {
            for (i64 i = 0; i < n; ++i) q[i] = 0;
            scale = 0.0f;
        }
        scale_out[r] = scale;
    }
}
