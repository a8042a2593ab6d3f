// A weight row's elements as float32 vectors, with fastllm's formulas for the quantized kinds;
// shared by the float32 tiles (linear_simd.cpp) and the bfloat16 prefill (prefill_bf16.cpp).
#pragma once
#include "flm_kernels.h"
#include "simd.h"

namespace flm {

// W weights of row n starting at column k, as float32.
inline vec load_w(const Params &p, int64_t n, int64_t k) {
    const uint8_t *row = p.w + n * p.row_bytes;
    switch (p.kind) {
    case INT8: return vfma(load_q8(row + k), vset(p.scale[n]), vset(p.shift[n]));
    case INT4: {
        int64_t g = n * p.groups_per_row + k / p.group;
        return vfma(load_u4(row + k / 2), vset(p.scale[g]), vset(p.shift[g]));
    }
    default: return load_stored(p.kind, row, k);
    }
}

// An int8 row's sum of q * x (q as stored, 0..255) to its output: the 128 of q - 128 folded
// into the shift term, times sum(x).
inline float int8_output(const Params &p, int64_t n, float y, float xsum) {
    return y * p.scale[n] + (p.shift[n] - 128.f * p.scale[n]) * xsum;
}

}  // namespace flm
