// flm's CPU linear kernels (AVX-512): y[M, N] = x[M, K] (float32) times W[N, K]^T, with W in
// its .flm storage type, widened 16 weights at a time to float32 with fastllm's formulas and
// accumulated in float32. Decode (small M) reads every weight exactly once; prefill callers
// use `dequantize_rows` and a float32 GEMM instead.
//
// Weight kinds:   0 bf16, 1 fp16, 2 int8 (w = q * scale + shift, shift = -zero * scale),
//                 3 int4 with per-group (lo, scale): w = lo + scale * q, nibbles high-first;
//                 per-row int4 is the case group = K.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

namespace {

constexpr int MB = 8;  // x rows per pass over the weights

struct Params {
    int kind;
    const uint8_t *w;       // packed weights, row-major
    int64_t row_bytes;      // bytes per weight row
    const float *scale;     // int8: [N]; int4: [N * groups]
    const float *shift;     // int8: [N] (-zero*scale); int4: lo [N * groups]
    int64_t group;          // int4 elements per group
    int64_t groups_per_row; // int4 (min, scale) pairs per row
};

inline __m512 load16(const Params &p, int64_t n, int64_t k) {
    const uint8_t *row = p.w + n * p.row_bytes;
    switch (p.kind) {
    case 0: {
        __m256i h = _mm256_loadu_si256((const __m256i *)(row + 2 * k));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case 1: {
        __m256i h = _mm256_loadu_si256((const __m256i *)(row + 2 * k));
        return _mm512_cvtph_ps(h);
    }
    case 2: {
        __m128i q = _mm_loadu_si128((const __m128i *)(row + k));
        __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
        return _mm512_fmadd_ps(v, _mm512_set1_ps(p.scale[n]), _mm512_set1_ps(p.shift[n]));
    }
    default: {
        __m128i bytes = _mm_loadl_epi64((const __m128i *)(row + k / 2));
        __m128i wide = _mm_cvtepu8_epi16(bytes);
        __m128i hi = _mm_srli_epi16(wide, 4);
        __m128i lo = _mm_and_si128(wide, _mm_set1_epi16(0xF));
        __m256i both = _mm256_set_m128i(_mm_unpackhi_epi16(hi, lo), _mm_unpacklo_epi16(hi, lo));
        __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(both));
        int64_t g = n * p.groups_per_row + k / p.group;
        return _mm512_fmadd_ps(v, _mm512_set1_ps(p.scale[g]), _mm512_set1_ps(p.shift[g]));
    }
    }
}

Params params(int64_t kind, const torch::Tensor &w, const torch::Tensor &scale, const torch::Tensor &shift,
              int64_t group, int64_t groups_per_row) {
    TORCH_CHECK(w.is_contiguous() && w.dim() == 2, "weights must be a contiguous 2-D tensor");
    TORCH_CHECK(kind < 3 || group % 32 == 0, "int4 groups must be a multiple of 32");
    Params p{(int)kind, (const uint8_t *)w.data_ptr(), w.size(1) * w.element_size(), nullptr, nullptr, group,
             groups_per_row};
    if (kind >= 2) {
        TORCH_CHECK(scale.scalar_type() == torch::kFloat && shift.scalar_type() == torch::kFloat, "float32 params");
        p.scale = scale.data_ptr<float>();
        p.shift = shift.data_ptr<float>();
    }
    return p;
}

}  // namespace

// int4 weights, 32 at a time, against x whose 32-blocks were reordered evens-then-odds
// (`deinterleave`): the high nibbles pair with the even elements, the low ones with the odd.
inline void int4_block(const Params &p, int64_t n, int64_t k, const float *xs, int64_t k_in, int64_t mb,
                       __m512 *acc) {
    const uint8_t *row = p.w + n * p.row_bytes;
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k / 2)));
    int64_t g = n * p.groups_per_row + k / p.group;
    __m512 s = _mm512_set1_ps(p.scale[g]), lo = _mm512_set1_ps(p.shift[g]);
    __m512 w_even = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), s, lo);
    __m512 w_odd = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF))), s, lo);
    for (int64_t i = 0; i < mb; ++i) {
        acc[i] = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(xs + i * k_in + k), acc[i]);
        acc[i] = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xs + i * k_in + k + 16), acc[i]);
    }
}

torch::Tensor deinterleave(const torch::Tensor &x) {
    auto m = x.size(0), k = x.size(1);
    auto blocks = x.reshape({m, k / 32, 16, 2});
    return blocks.transpose(2, 3).contiguous().reshape({m, k});
}

// x: [M, K] float32 contiguous; returns [M, N] float32.
torch::Tensor linear(torch::Tensor x, int64_t kind, torch::Tensor w, torch::Tensor scale, torch::Tensor shift,
                     int64_t group, int64_t groups_per_row, int64_t n_out, int64_t k_in) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == k_in,
                "x must be contiguous float32 [M, K]");
    TORCH_CHECK(k_in % 32 == 0, "K must be a multiple of 32");
    Params p = params(kind, w, scale, shift, group, groups_per_row);
    const int64_t M = x.size(0);
    auto y = torch::empty({M, n_out}, x.options());
    torch::Tensor xin = kind == 3 ? deinterleave(x) : x;
    const float *xs = xin.data_ptr<float>();
    float *ys = y.data_ptr<float>();
    at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = std::min<int64_t>(MB, M - m0);
            const float *xm = xs + m0 * k_in;
            for (int64_t n = begin; n < end; ++n) {
                __m512 acc[MB];
                for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
                if (p.kind == 3) {
                    for (int64_t k = 0; k < k_in; k += 32) int4_block(p, n, k, xm, k_in, mb, acc);
                } else {
                    for (int64_t k = 0; k < k_in; k += 16) {
                        __m512 wv = load16(p, n, k);
                        for (int64_t i = 0; i < mb; ++i)
                            acc[i] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xm + i * k_in + k), acc[i]);
                    }
                }
                for (int64_t i = 0; i < mb; ++i) ys[(m0 + i) * n_out + n] = _mm512_reduce_add_ps(acc[i]);
            }
        }
    });
    return y;
}

// Rows [row0, row1) of W widened to float32: [row1 - row0, K].
torch::Tensor dequantize_rows(int64_t kind, torch::Tensor w, torch::Tensor scale, torch::Tensor shift,
                              int64_t group, int64_t groups_per_row, int64_t row0, int64_t row1, int64_t k_in) {
    Params p = params(kind, w, scale, shift, group, groups_per_row);
    auto out = torch::empty({row1 - row0, k_in}, torch::dtype(torch::kFloat));
    float *os = out.data_ptr<float>();
    at::parallel_for(row0, row1, 16, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
            for (int64_t k = 0; k < k_in; k += 16) _mm512_storeu_ps(os + (n - row0) * k_in + k, load16(p, n, k));
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("linear", &linear, "y = x W^T with W in its storage type");
    m.def("dequantize_rows", &dequantize_rows, "rows of W as float32");
}
