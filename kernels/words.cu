// Integer codes packed densely into int32 words (GPTQ, AWQ, compressed-tensors), and the check that
// packed words decode to the method's reconstruction. The executable specification is words.py.
//
// A layout (i64[8]: bits, axis, line_major, per, offset, lines, length, words_per_line) describes how a
// (rows, cols) matrix of signed codes is stored: "lines" run across `axis` (axis 1: one line per row),
// element k of a line sits at bit k * bits of the line's bit stream (u = (code + offset) masked to bits),
// each line padded with zero bits to whole words; within each run of `per` elements, slot j holds element
// order[j] (AWQ's interleave; per is 1 when no order applies). Words are stored line-major
// (lines, words_per_line) or word-major (words_per_line, lines).
#include "qf_cuda.h"

enum { L_BITS, L_AXIS, L_LINE_MAJOR, L_PER, L_OFFSET, L_LINES, L_LENGTH, L_WPL };

QF_DEVICE i64 qf_word_index(const i64* lay, i64 line, i64 w) {
    return lay[L_LINE_MAJOR] ? line * lay[L_WPL] + w : w * lay[L_LINES] + line;
}

// One thread per output word, in the output's memory order (so writes coalesce): OR in every element
// whose bits fall in it.
QF_KERNEL void pack_words(const i8* codes, i32* out, const i64* lay, const i32* order, i64 cols) {
    const i64 bits = lay[L_BITS], per = lay[L_PER], length = lay[L_LENGTH], wpl = lay[L_WPL], lines = lay[L_LINES];
    const u32 mask = (1u << bits) - 1u;
    QF_FOR(t, lines * wpl) {
        const i64 line = lay[L_LINE_MAJOR] ? t / wpl : t % lines;
        const i64 w = lay[L_LINE_MAJOR] ? t % wpl : t / lines;
        const i64 first = (32 * w) / bits;
        i64 last = (32 * w + 31) / bits;
        if (last > length - 1) last = length - 1;
        u32 word = 0;
        for (i64 slot = first; slot <= last; ++slot) {
            const i64 e = (slot / per) * per + order[slot % per];
            const i64 at = lay[L_AXIS] == 1 ? line * cols + e : e * cols + line;
            const u32 u = (u32)((i32)codes[at] + (i32)lay[L_OFFSET]) & mask;
            const i64 p = slot * bits - 32 * w;
            word |= p >= 0 ? u << p : u >> (-p);
        }
        out[t] = (i32)word;
    }
}

// The signed code of element `e` of `line` (inverse[j]: the slot of element j within its run).
QF_DEVICE i32 qf_code_at(const i32* words, const i64* lay, const i32* inverse, i64 line, i64 e) {
    const i64 bits = lay[L_BITS], per = lay[L_PER];
    const i64 p = ((e / per) * per + inverse[e % per]) * bits;
    const i64 w = p / 32, o = p % 32;
    u32 u = (u32)words[qf_word_index(lay, line, w)] >> o;
    if (o + bits > 32) u |= (u32)words[qf_word_index(lay, line, w + 1)] << (32 - o);
    return (i32)(u & ((1u << bits) - 1u)) - (i32)lay[L_OFFSET];
}

QF_DEVICE i32 qf_matrix_code(const i32* words, const i64* lay, const i32* inverse, i64 r, i64 c) {
    return lay[L_AXIS] == 1 ? qf_code_at(words, lay, inverse, r, c) : qf_code_at(words, lay, inverse, c, r);
}

// One thread per weight element (rows, cols): scale[r, c / group] * (q - z) against expected[r, c].
// Scales are float32 at scale[r * s_row + g * s_group]; zeros, when has_zeros, are packed like codes
// in their own (rows, groups) layout and get zero_adjust added (GPTQ v1 stores zero - 1).
QF_KERNEL void verify_words(const i32* words, const i64* lay, const i32* inverse, const float* scales, i64 s_row,
                            i64 s_group, i64 group, const i32* zwords, const i64* zlay, const i32* zinverse,
                            i64 has_zeros, i64 zero_adjust, const float* expected, i64 rows, i64 cols, float atol,
                            qf_verdict* verdict) {
    QF_FOR(i, rows * cols) {
        const i64 r = i / cols, c = i % cols, g = c / group;
        const i32 q = qf_matrix_code(words, lay, inverse, r, c);
        const i32 z = has_zeros ? qf_matrix_code(zwords, zlay, zinverse, r, g) + (i32)zero_adjust : 0;
        const float decoded = scales[r * s_row + g * s_group] * (float)(q - z);
        qf_check(verdict, (u64)i, decoded, expected[i], atol);
    }
}
