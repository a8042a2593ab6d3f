// Vector primitives for one instruction set, chosen at compile time: 16-lane AVX-512 when built
// with -mavx512f, else 8-lane AVX2 with FMA and F16C. Everything above this layer is shared.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "kinds.h"

namespace flm {

// The sum of 8 float lanes: lanes k + (k + 4), then 0 + 2 and 1 + 3, then those two (the same
// additions as an AVX-512 vsum of a vector whose upper 8 lanes are zeros, bit for bit).
inline float vsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Lane j: vsum8(v[j]), for C <= 8 vectors at once and bit for bit: the same pairs added in the
// same order, lanes k + (k + 4), then 0 + 2 and 1 + 3, then those two; about a third of the
// instructions of C separate vsum8s.
template <int C>
inline __m256 lane_sums(const __m256 (&v)[C]) {
    auto at = [&](int j) { return j < C ? v[j] : _mm256_setzero_ps(); };
    auto halves = [&](int j) {  // [a0+a4 .. a3+a7 | b0+b4 .. b3+b7]
        const __m256 a = at(j), b = at(j + 1);
        return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    };
    auto pairs = [](__m256 ab, __m256 cd) {  // [a02 a13 c02 c13 | b02 b13 d02 d13]
        return _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
    };
    const __m256 ac = pairs(halves(0), halves(2)), eg = pairs(halves(4), halves(6));
    const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(ac, eg, 0x88), _mm256_shuffle_ps(ac, eg, 0xDD));  // [a c e g | b d f h]
    return _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

#if defined(__AVX512F__)
// ------------------------------------------------------------------ AVX-512: 16 lanes
using vec = __m512;
constexpr int W = 16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset(float v) { return _mm512_set1_ps(v); }
inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vround(vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vmax_abs(vec top, vec v) { return _mm512_max_ps(top, _mm512_abs_ps(v)); }
inline float vmax(vec v) { return _mm512_reduce_max_ps(v); }
inline vec vmax_lanes(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vmin_lanes(vec a, vec b) { return _mm512_min_ps(a, b); }
// 2^n for whole n in [-126, 127], through the exponent bits
inline vec vpow2(vec n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
// y where x >= lo, else 0
inline vec vzero_below(vec y, vec x, float lo) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vset(lo), _CMP_GE_OQ), y); }

inline vec load_bf16(const uint8_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vec load_fp16(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
// Split loads: one 64-byte load of bf16 or int8 weights widened to float32 by shifts and masks
// within 32-bit lanes into S vectors, vector s holding elements j * S + s; load_bf16 and load_u8
// widen with cross-lane shuffles, which AMD Zen 4 runs at half rate on 512-bit vectors. One x
// row against these rows reads them so (rows_in_order), x reordered to match. The AVX2 build
// keeps its loads: bf16 pairs there were slower (bench/HISTORY.md, "Streaming weights on Zen 4").
constexpr int split_loads(int kind) { return kind == BF16 ? 2 : kind == INT8 ? 4 : 1; }
inline void load_split(int kind, const uint8_t *p, vec *out) {
    const __m512i v = _mm512_loadu_si512(p);
    if (kind == BF16) {  // 32 bf16: the even elements, the odd ones
        out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        out[1] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
    } else {  // 64 int8 codes as stored (0..255), by their place in each 4 bytes
        const __m512i byte = _mm512_set1_epi32(0xFF);
        out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(v, byte));
        out[1] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8), byte));
        out[2] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 16), byte));
        out[3] = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 24));
    }
}
// 16 int8 codes q (0..255) as q - 128.
inline vec load_q8(const uint8_t *p) {
    __m128i q = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_set1_epi8((char)0x80));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
}
// 16 int8 codes q as they are (0..255): one instruction fewer than load_q8, for the GEMV tiles.
inline vec load_u8(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p))); }
// 16 signed int8 values (a KV cache's codes).
inline vec load_i8(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
// 16 int4 values from 8 bytes in element order (high nibble first).
inline vec load_u4(const uint8_t *p) {
    __m128i wide = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    __m128i hi = _mm_srli_epi16(wide, 4);
    __m128i lo = _mm_and_si128(wide, _mm_set1_epi16(0xF));
    __m256i both = _mm256_set_m128i(_mm_unpackhi_epi16(hi, lo), _mm_unpacklo_epi16(hi, lo));
    return _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(both));
}
// Part h of 32 int4 values (16 bytes) split into even and odd elements, W lanes each.
inline void load_u4_half(const uint8_t *p, int /*h*/, vec &even, vec &odd) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    even = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
    odd = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)));
}
#else
// ------------------------------------------------------------------ AVX2 + FMA + F16C: 8 lanes
using vec = __m256;
constexpr int W = 8;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset(float v) { return _mm256_set1_ps(v); }
inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
inline void vstore(float *p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float vsum(vec v) { return vsum8(v); }
inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vround(vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vmax_abs(vec top, vec v) { return _mm256_max_ps(top, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v)); }
inline float vmax(vec v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline vec vmax_lanes(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vmin_lanes(vec a, vec b) { return _mm256_min_ps(a, b); }
inline vec vpow2(vec n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vec vzero_below(vec y, vec x, float lo) { return _mm256_and_ps(y, _mm256_cmp_ps(x, vset(lo), _CMP_GE_OQ)); }

inline vec load_bf16(const uint8_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vec load_fp16(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
// No split loads here (see the AVX-512 section); load_split is never called.
constexpr int split_loads(int) { return 1; }
inline void load_split(int, const uint8_t *, vec *) {}
// 8 int8 codes q (0..255) as q - 128.
inline vec load_q8(const uint8_t *p) {
    __m128i q = _mm_xor_si128(_mm_loadl_epi64((const __m128i *)p), _mm_set1_epi8((char)0x80));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
}
// 8 int8 codes q as they are (0..255): one instruction fewer than load_q8, for the GEMV tiles.
inline vec load_u8(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
inline vec load_i8(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
// 8 int4 values from 4 bytes in element order (high nibble first).
inline vec load_u4(const uint8_t *p) {
    int32_t four;
    std::memcpy(&four, p, 4);
    __m256i bytes = _mm256_cvtepu8_epi32(_mm_cvtsi32_si128(four));
    __m256i twice = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    __m256i nibbles = _mm256_and_si256(_mm256_srlv_epi32(twice, _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0)),
                                       _mm256_set1_epi32(0xF));
    return _mm256_cvtepi32_ps(nibbles);
}
// Part h of 32 int4 values (16 bytes) split into even and odd elements, W lanes each.
inline void load_u4_half(const uint8_t *p, int h, vec &even, vec &odd) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * h)));
    even = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
    odd = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
}
#endif

// 32 integers held as float32 (|q| < 2^15) -> int16, evens first then odds (the int4 tiles' x
// order); returns their sum.
inline int32_t evens_then_odds_i16(const float *q, int16_t *out) {
#if defined(__AVX512F__)
    const __m512i a = _mm512_cvtps_epi32(_mm512_loadu_ps(q)), b = _mm512_cvtps_epi32(_mm512_loadu_ps(q + 16));
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(_mm512_permutex2var_epi32(a, evens, b)));
    _mm256_storeu_si256((__m256i *)(out + 16), _mm512_cvtepi32_epi16(_mm512_permutex2var_epi32(a, odds, b)));
    return _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
#else
    int32_t total = 0;
    for (int j = 0; j < 32; ++j) {
        out[(j % 2) * 16 + j / 2] = (int16_t)q[j];
        total += (int32_t)q[j];
    }
    return total;
#endif
}

// W weights of a row stored as `kind` (BF16, FP16, FP32; INT8 codes as stored, 0..255), from
// element k, as float32.
inline vec load_stored(int kind, const uint8_t *row, int64_t k) {
    switch (kind) {
    case BF16: return load_bf16(row + 2 * k);
    case FP16: return load_fp16(row + 2 * k);
    case FP32: return vload((const float *)row + k);
    default: return load_u8(row + k);
    }
}

// acc plus the products of a and b's int16 lanes, summed pairwise into its int32 lanes: one
// VNNI instruction (vpdpwssd) where the build has it, else multiply-add then add. The sums are the
// same exactly (the int4 kernels multiply codes 0..15, which never saturate).
inline __m256i dot_add_i16(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));  // in place: see dot_add_i16_512
    return acc;
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

#if defined(__AVX512F__)
// dot_add_i16 on 512-bit vectors (32 int16 products into 16 int32 lanes). vpdpwssd through
// inline asm, the sum updated in place: with the intrinsic, GCC 12 copied int4_pair_sums' sums
// between registers and kept four of its sixteen on the stack, a load and a store each per step.
inline __m512i dot_add_i16_512(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
#endif

// e^x per lane, within 1 ulp of the exact value as expf is (every 97th float of the range; mean
// 0.035 ulp): x = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts), Cephes' degree-7 polynomial for
// e^r, times 2^n. x is clamped to [-87.3, 88.3]: below, 0 (where expf's results turn subnormal);
// above, e^88.3 (expf: up to FLT_MAX, then inf). For the decode step's softmax and SiLU, whose
// scalar expf calls took longer than the rest of their work.
inline vec vexp(vec x) {
    constexpr float LO = -87.3f, HI = 88.3f;
    const vec clamped = vmin_lanes(vmax_lanes(x, vset(LO)), vset(HI));
    const vec n = vround(vmul(clamped, vset(1.44269504088896341f)));
    vec r = vfma(n, vset(-0.693359375f), clamped);
    r = vfma(n, vset(2.12194440e-4f), r);
    vec p = vset(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        p = vfma(p, r, vset(c));
    const vec e = vfma(p, vmul(r, r), vadd(r, vset(1.f)));
    return vzero_below(vmul(e, vpow2(n)), x, LO);
}

// sum(a[i] * b[i]) for any n (vector body, scalar tail; no horizontal sum below W: the int4
// tiles' shift terms call it per output, over a row's groups, one for per-row int4 prompts)
inline float dot(const float *a, const float *b, int64_t n) {
    vec acc = vzero();
    int64_t i = 0;
    for (; i + W <= n; i += W) acc = vfma(vload(a + i), vload(b + i), acc);
    float s = n >= W ? vsum(acc) : 0.f;
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

// y += a * x for any n
inline void axpy(float a, const float *x, float *y, int64_t n) {
    const vec av = vset(a);
    int64_t i = 0;
    for (; i + W <= n; i += W) vstore(y + i, vfma(av, vload(x + i), vload(y + i)));
    for (; i < n; ++i) y[i] += a * x[i];
}

}  // namespace flm
