// Vector operation sets, one struct per instruction set, with one interface so that
// cpu_kernels.h can be written once and compiled once per ISA (see cpu_ops.cpp).
//
// Each struct provides: W (lanes), type `F` (W floats), load/store of fp32, bf16 and fp16
// memory into fp32 registers, and the arithmetic the optimizer bodies use. 16-bit stores
// round to nearest even, like torch's `.to(bfloat16)` / `.to(float16)`; NaN stays NaN.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace dsrun_simd {

// ---------------------------------------------------------------- scalar helpers
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;  // quiet NaN, as c10::BFloat16 does
    u += 0x7FFFu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}
// IEEE half <-> float without hardware help (used by the scalar path and tails).
static inline float fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400u) == 0);
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FFu) << 13);
        }
    } else if (exp == 0x1F) {
        u = sign | 0x7F800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_fp16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t au = u & 0x7FFFFFFFu;
    if (au >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (au > 0x7F800000u ? 0x200u : 0u));
    if (au >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds to >= 65520: inf
    if (au < 0x38800000u) {  // result is subnormal or zero
        if (au < 0x33000000u) return (uint16_t)sign;  // < 2^-25 rounds to zero
        uint32_t e = au >> 23, man = (au & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126 - e;  // 14 + (113 - e) ... places the value in units of 2^-24
        uint32_t q = man >> shift, rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = au + 0xFFFu + ((au >> 13) & 1u);  // round mantissa to 10 bits, nearest even
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

struct Scalar {
    static constexpr int W = 1;
    using F = float;
    static inline F set1(float x) { return x; }
    static inline F load(const float* p) { return *p; }
    static inline F load_bf16(const uint16_t* p) { return bf16_to_f32(*p); }
    static inline F load_fp16(const uint16_t* p) { return fp16_to_f32(*p); }
    static inline void store(float* p, F x) { *p = x; }
    static inline void store_bf16(uint16_t* p, F x) { *p = f32_to_bf16(x); }
    static inline void store_fp16(uint16_t* p, F x) { *p = f32_to_fp16(x); }
    static inline F add(F a, F b) { return a + b; }
    static inline F sub(F a, F b) { return a - b; }
    static inline F mul(F a, F b) { return a * b; }
    static inline F div(F a, F b) { return a / b; }
    static inline F div_const(F a, F b, F) { return a / b; }
    static inline F sqrt(F a) { return std::sqrt(a); }
    static inline F fmadd(F a, F b, F c) { return std::fma(a, b, c); }
    static inline void store_nt(float* p, F x) { store(p, x); }
    static inline void store_bf16_nt(uint16_t* p, F x) { store_bf16(p, x); }
    static inline void store_fp16_nt(uint16_t* p, F x) { store_fp16(p, x); }
    static inline void fence() {}
};

}  // namespace dsrun_simd

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DSRUN_X86 1

namespace dsrun_simd {

// Compiled only inside functions that carry target("avx512f,avx512bw,...") (cpu_ops.cpp).
#define DSRUN_AVX512_STRUCT                                                                     \
    struct Avx512 {                                                                             \
        static constexpr int W = 16;                                                            \
        using F = __m512;                                                                       \
        static inline F set1(float x) { return _mm512_set1_ps(x); }                             \
        static inline F load(const float* p) { return _mm512_loadu_ps(p); }                    \
        static inline F load_bf16(const uint16_t* p) {                                          \
            __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));          \
            return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));                               \
        }                                                                                       \
        static inline F load_fp16(const uint16_t* p) {                                          \
            return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));                      \
        }                                                                                       \
        static inline void store(float* p, F x) { _mm512_storeu_ps(p, x); }                    \
        static inline void store_bf16(uint16_t* p, F x) {                                       \
            __m512i u = _mm512_castps_si512(x);                                                 \
            __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));     \
            __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));  \
            r = _mm512_srli_epi32(r, 16);                                                       \
            __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);                             \
            r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));                       \
            _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));                         \
        }                                                                                       \
        static inline void store_fp16(uint16_t* p, F x) {                                       \
            _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));    \
        }                                                                                       \
        static inline F add(F a, F b) { return _mm512_add_ps(a, b); }                           \
        static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }                           \
        static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }                           \
        static inline F div(F a, F b) { return _mm512_div_ps(a, b); }                           \
        /* a / b for a constant b with rb = 1/b rounded: q = a*rb plus one residual        */ \
        /* correction rounds like the divide (see [Note: Adam update without dividers]).      */ \
        static inline F div_const(F a, F b, F rb) {                                             \
            F q = _mm512_mul_ps(a, rb);                                                         \
            F e = _mm512_fmsub_ps(b, q, a); /* NaN where a is +-inf: keep q */                   \
            return _mm512_mask3_fnmadd_ps(e, rb, q, _mm512_cmp_ps_mask(e, e, _CMP_ORD_Q));      \
        }                                                                                       \
        static inline F sqrt(F a) { return _mm512_sqrt_ps(a); }                                \
        static inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }              \
        static inline void store_nt(float* p, F x) { _mm512_stream_ps(p, x); }                  \
        static inline void store_bf16_nt(uint16_t* p, F x) {                                    \
            __m512i u = _mm512_castps_si512(x);                                                 \
            __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));     \
            __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));  \
            r = _mm512_srli_epi32(r, 16);                                                       \
            __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);                             \
            r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));                       \
            _mm256_stream_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));                         \
        }                                                                                       \
        static inline void store_fp16_nt(uint16_t* p, F x) {                                    \
            _mm256_stream_si256((__m256i*)p, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));    \
        }                                                                                       \
        static inline void fence() { _mm_sfence(); }                                            \
    };

#define DSRUN_AVX2_STRUCT                                                                       \
    struct Avx2 {                                                                               \
        static constexpr int W = 8;                                                             \
        using F = __m256;                                                                       \
        static inline F set1(float x) { return _mm256_set1_ps(x); }                             \
        static inline F load(const float* p) { return _mm256_loadu_ps(p); }                    \
        static inline F load_bf16(const uint16_t* p) {                                          \
            __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));             \
            return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));                               \
        }                                                                                       \
        static inline F load_fp16(const uint16_t* p) {                                          \
            return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));                         \
        }                                                                                       \
        static inline void store(float* p, F x) { _mm256_storeu_ps(p, x); }                    \
        static inline void store_bf16(uint16_t* p, F x) {                                       \
            __m256i u = _mm256_castps_si256(x);                                                 \
            __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));     \
            __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));  \
            r = _mm256_srli_epi32(r, 16);                                                       \
            __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));               \
            r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);                          \
            __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);        \
            _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(lo, hi));                            \
        }                                                                                       \
        static inline void store_fp16(uint16_t* p, F x) {                                       \
            _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));       \
        }                                                                                       \
        static inline F add(F a, F b) { return _mm256_add_ps(a, b); }                           \
        static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }                           \
        static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }                           \
        static inline F div(F a, F b) { return _mm256_div_ps(a, b); }                           \
        static inline F div_const(F a, F b, F rb) {  /* as Avx512::div_const */            \
            F q = _mm256_mul_ps(a, rb);                                                         \
            F e = _mm256_fmsub_ps(b, q, a);                                                     \
            return _mm256_blendv_ps(q, _mm256_fnmadd_ps(e, rb, q), _mm256_cmp_ps(e, e, _CMP_ORD_Q)); \
        }                                                                                       \
        static inline F sqrt(F a) { return _mm256_sqrt_ps(a); }                                \
        static inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }              \
        static inline void store_nt(float* p, F x) { _mm256_stream_ps(p, x); }                  \
        static inline void store_bf16_nt(uint16_t* p, F x) {                                    \
            __m256i u = _mm256_castps_si256(x);                                                 \
            __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));     \
            __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));  \
            r = _mm256_srli_epi32(r, 16);                                                       \
            __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));               \
            r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);                          \
            __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);        \
            _mm_stream_si128((__m128i*)p, _mm_packus_epi32(lo, hi));                            \
        }                                                                                       \
        static inline void store_fp16_nt(uint16_t* p, F x) {                                    \
            _mm_stream_si128((__m128i*)p, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));       \
        }                                                                                       \
        static inline void fence() { _mm_sfence(); }                                            \
    };

}  // namespace dsrun_simd
#endif
