// Shared declarations of flm's CPU kernels: the linear kernels (linear_simd.cpp), the one-call
// decode step (decode_step.cpp) and their Python bindings (bindings.cpp).
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kinds.h"

namespace flm {

// A weight of one of the kinds of kinds.h, as the kernels read it.
struct Params {
    Kind kind;
    const uint8_t *w;       // packed weights, row-major
    int64_t row_bytes;      // bytes per weight row
    const float *scale;     // int8: [N]; int4: [N * groups]
    const float *shift;     // int8: [N] ((128 - zero) * scale); int4: lo [N * groups]
    int64_t group;          // int4 elements per group
    int64_t groups_per_row; // int4 (min, scale) pairs per row
    int64_t n;              // output rows
};

// Checks the weight rows hold K elements of `kind`.
Params make_params(Kind kind, const torch::Tensor &w, const torch::Tensor &scale, const torch::Tensor &shift,
                   int64_t group, int64_t groups_per_row, int64_t k_in);

// y[M, sum of n] = x[M, K] times the weights' transposes, outputs side by side; all parts share
// kind, K and group layout. Plain pointers: no tensor is created (the decode step calls it
// four times per layer and ATen's per-op overhead would dominate small models). steps: the x
// rows are different sequences' tokens (a served batch), each computed as it would be alone
// (int4: bit for bit), never in a prompt's blocks, however many.
void linear_raw(const std::vector<Params> &parts, int64_t M, const float *x, int64_t k_in, float *y, bool steps);

// linear_raw for a prompt in bfloat16 (prefill_bf16.cpp): bf16, int8 or int4 weights, in a
// build for AVX512-BF16 (has_prefill_bf16).
bool has_prefill_bf16();
void linear_bf16(const std::vector<Params> &parts, int64_t M, const float *x, int64_t k_in, float *y);

// f(std::integral_constant<int, count>) for 1 <= count <= MAX: a runtime row count as a
// compile-time one, so that a tile's accumulators stay in registers.
template <int MAX, typename F>
inline void with_row_count(int64_t count, F &&f) {
    if constexpr (MAX > 1)
        if (count < MAX) return with_row_count<MAX - 1>(count, f);
    f(std::integral_constant<int, MAX>{});
}

// The output rows [0, sum of n) of several parts split across threads: body(j, lo, hi, y_j) for
// each part j's rows [lo, hi) in a thread's share, y_j its first output column. chunk 0: one
// contiguous share per thread; else chunks of that many rows, each taken by whichever thread is
// free, so that a thread the OS preempts (for a server's HTTP thread, or a client on the same
// cores) delays the layer by its current chunk rather than by its whole share (bench/HISTORY.md,
// "Attention in blocks, decode rows in chunks").
template <typename Body>
void parallel_parts(const std::vector<Params> &parts, float *y, int64_t chunk, Body &&body) {
    std::vector<int64_t> offsets(parts.size() + 1, 0);
    for (size_t j = 0; j < parts.size(); ++j) offsets[j + 1] = offsets[j] + parts[j].n;
    const int64_t total = offsets.back();
    auto rows = [&](int64_t begin, int64_t end) {
        for (size_t j = 0; j < parts.size(); ++j) {
            const int64_t lo = std::max(begin, offsets[j]) - offsets[j];
            const int64_t hi = std::min(end, offsets[j + 1]) - offsets[j];
            if (lo < hi) body(j, lo, hi, y + offsets[j]);
        }
    };
    if (chunk == 0) {
        at::parallel_for(0, total, 16, rows);
        return;
    }
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
        for (int64_t begin; (begin = next.fetch_add(chunk)) < total;) rows(begin, std::min(total, begin + chunk));
    });
}

// The same for torch tensors; in_bf16: through linear_bf16 (a prompt), else linear_raw.
torch::Tensor linear(torch::Tensor x, Kind kind, std::vector<torch::Tensor> ws, std::vector<torch::Tensor> scales,
                     std::vector<torch::Tensor> shifts, int64_t group, int64_t groups_per_row,
                     std::vector<int64_t> n_outs, int64_t k_in, bool in_bf16, bool steps);
// Rows [row0, row1) of W as float32, written into `out` ([row1 - row0, k_in], contiguous).
void dequantize_rows(Kind kind, torch::Tensor w, torch::Tensor scale, torch::Tensor shift, int64_t group,
                     int64_t groups_per_row, int64_t row0, int64_t row1, int64_t k_in, torch::Tensor out);

}  // namespace flm
