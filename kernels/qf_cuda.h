// What every kernel source includes: under NVRTC (CuPy) the CUDA built-ins as they are; under g++ a shim
// that makes the same .cu file plain C++, so the CPU build runs the logic the GPU runs.
//
// The CPU build sets blockIdx/threadIdx/blockDim/gridDim (per OS thread) through qf_set_launch() and calls
// the kernel once per (block, thread): kernels index with grid-stride loops and reduce with atomics, never
// with warp-synchronous tricks or shared memory, so running the threads of a block in sequence, blocks on
// several OS threads at once, is one legal schedule of the GPU's. Float rounding is kept identical on both:
// NVRTC compiles with --fmad=false and g++ with -ffp-contract=off, so a*b+c is never fused on one side only.
#pragma once

typedef signed char i8;
typedef unsigned char u8;
typedef unsigned short u16;
typedef int i32;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#ifdef __CUDACC__

#define QF_KERNEL extern "C" __global__
#define QF_DEVICE __device__ __forceinline__
QF_DEVICE u32 qf_float_bits(float x) { return __float_as_uint(x); }
QF_DEVICE float qf_bits_float(u32 b) { return __uint_as_float(b); }
QF_DEVICE bool qf_isnan(float x) { return isnan(x); }
QF_DEVICE bool qf_isinf(float x) { return isinf(x); }

#else

#include <cmath>
#include <cstring>

#define QF_KERNEL extern "C"
#define QF_DEVICE static inline
struct qf_dim3 { unsigned int x, y, z; };
static thread_local qf_dim3 blockIdx, threadIdx, blockDim, gridDim;

extern "C" void qf_set_launch(unsigned int block, unsigned int thread, unsigned int block_dim, unsigned int grid_dim) {
    blockIdx = {block, 0, 0};
    threadIdx = {thread, 0, 0};
    blockDim = {block_dim, 1, 1};
    gridDim = {grid_dim, 1, 1};
}

QF_DEVICE u32 qf_float_bits(float x) { u32 b; std::memcpy(&b, &x, 4); return b; }
QF_DEVICE float qf_bits_float(u32 b) { float x; std::memcpy(&x, &b, 4); return x; }
QF_DEVICE bool qf_isnan(float x) { return std::isnan(x); }
QF_DEVICE bool qf_isinf(float x) { return std::isinf(x); }
// Blocks run on several OS threads at once: the atomics are the compiler's.
QF_DEVICE u64 atomicAdd(u64* p, u64 v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
QF_DEVICE u64 atomicMin(u64* p, u64 v) {
    u64 old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    return old;
}
QF_DEVICE u32 atomicMax(u32* p, u32 v) {
    u32 old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v > old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    return old;
}

#endif

// Grid-stride loop over [0, n): the same items reach the same code whatever the launch shape.
#define QF_FOR(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

// IEEE half <-> float, round to nearest even, as NumPy's astype(float16) does (NaN stays NaN, keeps its sign
// and top payload bits; overflow goes to Inf). Written out so both builds share one definition.
QF_DEVICE u16 qf_f32_to_f16(float x) {
    u32 b = qf_float_bits(x);
    u32 sign = (b >> 16) & 0x8000u;
    u32 e = (b >> 23) & 0xFFu;
    u32 m = b & 0x7FFFFFu;
    if (e == 0xFFu) return (u16)(sign | 0x7C00u | (m ? ((m >> 13) ? (m >> 13) : 1u) : 0u));  // NaN keeps a payload
    i32 exp = (i32)e - 127 + 15;
    if (exp >= 31) return (u16)(sign | 0x7C00u);
    if (exp <= 0) {  // subnormal half (or zero): shift the full mantissa, round to nearest even
        if (exp < -10) return (u16)sign;
        u32 full = m | 0x800000u;
        u32 shift = (u32)(14 - exp);
        u32 half = full >> shift;
        u32 rest = full & ((1u << shift) - 1u);
        u32 mid = 1u << (shift - 1u);
        if (rest > mid || (rest == mid && (half & 1u))) half += 1u;
        return (u16)(sign | half);
    }
    u32 half = ((u32)exp << 10) | (m >> 13);
    u32 rest = m & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) half += 1u;  // may carry into the exponent: still right
    return (u16)(sign | half);
}

QF_DEVICE float qf_f16_to_f32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 e = ((u32)h >> 10) & 0x1Fu;
    u32 m = (u32)h & 0x3FFu;
    if (e == 0x1Fu) return qf_bits_float(sign | 0x7F800000u | (m << 13));
    if (e == 0) {
        if (m == 0) return qf_bits_float(sign);
        float v = (float)m * 5.9604644775390625e-08f;  // m * 2^-24, exact
        return sign ? -v : v;
    }
    return qf_bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

// A little-endian fp16 in two bytes, as ggml's block structs store their scales.
QF_DEVICE void qf_put_f16(u8* o, float x) {
    const u16 h = qf_f32_to_f16(x);
    o[0] = (u8)(h & 0xFFu);
    o[1] = (u8)(h >> 8);
}

QF_DEVICE float qf_get_f16(const u8* o) { return qf_f16_to_f32((u16)(o[0] | (o[1] << 8))); }

// Verification result, one per call: the largest |decoded - expected| as float bits (non-negative floats
// order like their bits; NaN or Inf on either side counts as +Inf), how many elements differ by more than
// atol, and the first such flat index (UINT64_MAX when none).
struct qf_verdict { u32 max_err_bits; u32 pad; u64 mismatches; u64 first; };

QF_DEVICE void qf_check(qf_verdict* v, u64 index, float decoded, float expected, float atol) {
    float err;
    bool bad;
    if (qf_isnan(decoded) || qf_isnan(expected) || qf_isinf(decoded) || qf_isinf(expected)) {
        err = qf_bits_float(0x7F800000u);
        bad = !(decoded == expected);  // equal infinities of one sign pass; NaN never does
        if (!bad) err = 0.0f;
    } else {
        err = fabsf(decoded - expected);
        bad = err > atol;
    }
    if (err > 0.0f) atomicMax(&v->max_err_bits, qf_float_bits(err));
    if (bad) {
        atomicAdd(&v->mismatches, 1ull);
        atomicMin(&v->first, index);
    }
}
