// Rows of a KV cache in its storage kind (FP32, FP16, BF16, or INT8 with a float32 scale per row
// of head_dim values), written and read by the decode step. Rounding is torch's: float16 and
// bfloat16 to nearest even, int8 codes round(x / s), ties to even, s = max|x| / 127 (1 for a row
// of zeros), so that a row the step writes equals the row the reference forward writes.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kinds.h"
#include "simd.h"

namespace flm {

constexpr int64_t kv_bytes(int kind) { return kind == FP32 ? 4 : kind == INT8 ? 1 : 2; }

inline uint16_t to_bf16(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    if (std::isnan(x)) return 0x7FC0;
    bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even
    return (uint16_t)(bits >> 16);
}

// Row x[0, dim) stored at dst (and, for INT8, its scale at *scale).
template <int KV>
inline void store_kv_row(const float *x, int64_t dim, uint8_t *dst, float *scale) {
    if constexpr (KV == FP32) {
        std::memcpy(dst, x, dim * 4);
    } else if constexpr (KV == FP16) {
        uint16_t *out = (uint16_t *)dst;
        int64_t d = 0;
        for (; d + 8 <= dim; d += 8)
            _mm_storeu_si128((__m128i *)(out + d), _mm256_cvtps_ph(_mm256_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT));
        for (; d < dim; ++d) out[d] = _cvtss_sh(x[d], _MM_FROUND_TO_NEAREST_INT);
    } else if constexpr (KV == BF16) {
        uint16_t *out = (uint16_t *)dst;
        for (int64_t d = 0; d < dim; ++d) out[d] = to_bf16(x[d]);
    } else {
        float top = 0.f;
        for (int64_t d = 0; d < dim; ++d) top = std::max(top, std::fabs(x[d]));
        const float s = top > 0.f ? top / 127.f : 1.f;
        int8_t *out = (int8_t *)dst;
        for (int64_t d = 0; d < dim; ++d) out[d] = (int8_t)std::nearbyint(x[d] / s);
        *scale = s;
    }
}

// 8 values of a row from element i, as float32 (the attention's key dot products run 8 wide).
template <int KV>
inline __m256 load8_kv(const uint8_t *row, int64_t i) {
    if constexpr (KV == FP32) return _mm256_loadu_ps((const float *)row + i);
    if constexpr (KV == FP16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i)));
    if constexpr (KV == BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2 * i))), 16));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + i))));
}

// W values of a row from element i (the weighted sums run W wide).
template <int KV>
inline vec load_kv(const uint8_t *row, int64_t i) {
    if constexpr (KV == INT8) return load_i8(row + i);
    return load_stored(KV, row, i);
}

// One value of a row, as float32 (the rows' tails).
template <int KV>
inline float kv_at(const uint8_t *row, int64_t i) {
    if constexpr (KV == FP32) return ((const float *)row)[i];
    if constexpr (KV == FP16) return _cvtsh_ss(((const uint16_t *)row)[i]);
    if constexpr (KV == BF16) {
        const uint32_t bits = (uint32_t)((const uint16_t *)row)[i] << 16;
        float x;
        std::memcpy(&x, &bits, 4);
        return x;
    }
    return (float)((const int8_t *)row)[i];
}

}  // namespace flm
