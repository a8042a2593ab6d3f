// flm's CPU linear kernels: y[M, N] = x[M, K] (float32) times W[N, K]^T, with W in its .flm
// storage type, widened a vector at a time to float32 with fastllm's formulas and accumulated in
// float32. Decode (small M) reads every weight exactly once; prefill callers use
// `dequantize_rows` and a float32 GEMM instead.
//
// One source, two instruction sets: compiled with -mavx512f it uses 16-lane AVX-512 vectors,
// otherwise 8-lane AVX2 (+FMA, F16C). Only the primitives below differ; the loops are shared.
//
// Weight kinds:   0 bf16, 1 fp16, 2 int8 (w = q * scale + shift, shift = -zero * scale),
//                 3 int4 with per-group (lo, scale): w = lo + scale * q, nibbles high-first;
//                 per-row int4 is the case group = K.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int MB = 4;  // x rows per pass over a weight tile

struct Params {
    int kind;
    const uint8_t *w;       // packed weights, row-major
    int64_t row_bytes;      // bytes per weight row
    const float *scale;     // int8: [N]; int4: [N * groups]
    const float *shift;     // int8: [N] ((128 - zero) * scale); int4: lo [N * groups]
    int64_t group;          // int4 elements per group
    int64_t groups_per_row; // int4 (min, scale) pairs per row
};

#if defined(__AVX512F__)
// ------------------------------------------------------------------ AVX-512: 16 lanes
using vec = __m512;
constexpr int W = 16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset(float v) { return _mm512_set1_ps(v); }
inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }

inline vec load_bf16(const uint8_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vec load_fp16(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
// 16 int8 codes q (0..255) as q - 128.
inline vec load_q8(const uint8_t *p) {
    __m128i q = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_set1_epi8((char)0x80));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
}
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
inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline vec load_bf16(const uint8_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vec load_fp16(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
// 8 int8 codes q (0..255) as q - 128.
inline vec load_q8(const uint8_t *p) {
    __m128i q = _mm_xor_si128(_mm_loadl_epi64((const __m128i *)p), _mm_set1_epi8((char)0x80));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
}
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

constexpr int HALF = 16 / W;  // vectors per 16 even (or odd) int4 values

// W weights of row n starting at column k, as float32.
inline vec load_w(const Params &p, int64_t n, int64_t k) {
    const uint8_t *row = p.w + n * p.row_bytes;
    switch (p.kind) {
    case 0: return load_bf16(row + 2 * k);
    case 1: return load_fp16(row + 2 * k);
    case 2: return vfma(load_q8(row + k), vset(p.scale[n]), vset(p.shift[n]));
    default: {
        int64_t g = n * p.groups_per_row + k / p.group;
        return vfma(load_u4(row + k / 2), vset(p.scale[g]), vset(p.shift[g]));
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

// One tile: NR weight rows from n against MR x rows, written to out[i * n_out + r]. Both are
// compile-time so that the NR x MR accumulators live in registers; several independent ones
// keep the FMA units busy even for a single x row (one would wait on FMA latency every step).
// Quantized kinds multiply the integer codes with x and apply each row's (or group's) scale
// once at the end: y = scale * sum(q x) + shift * sum(x), with sum(x) per group in `xsum`
// [MR, K / group] (int4 with more than two x rows widens the weights instead, see below).
// int4 codes go 32 at a time against x whose 32-blocks were reordered evens-then-odds
// (`deinterleave`): the high nibbles pair with the even elements.
template <int KIND, int NR, int MR>
inline void tile(const Params &p, int64_t n, const float *xm, const float *xsum, int64_t k_in, float *out,
                 int64_t n_out) {
    vec acc[NR][MR];
    float offset[NR][MR] = {};
    for (int r = 0; r < NR; ++r)
        for (int i = 0; i < MR; ++i) acc[r][i] = vzero();
    const uint8_t *rows[NR];
    for (int r = 0; r < NR; ++r) rows[r] = p.w + (n + r) * p.row_bytes;
    // Rows are short (a few KB) and read NR at a time, too little for the hardware prefetcher
    // to ramp up: fetch the next tile's rows while this one computes, a cache line at a time.
    const int64_t ahead = NR * p.row_bytes;
    if constexpr (KIND == 3 && MR > 2) {
        // Many x rows share each weight: widen it once (w = lo + scale * q) and accumulate
        // directly; a second accumulator set per group would not fit in the registers.
        for (int64_t k = 0; k < k_in; k += 32) {
            if ((k / 2) % 64 == 0)
                for (int r = 0; r < NR; ++r) _mm_prefetch((const char *)rows[r] + ahead + k / 2, _MM_HINT_T0);
            for (int r = 0; r < NR; ++r) {
                const int64_t pg = (n + r) * p.groups_per_row + k / p.group;
                const vec s = vset(p.scale[pg]), lo = vset(p.shift[pg]);
                for (int h = 0; h < HALF; ++h) {
                    vec even, odd;
                    load_u4_half(rows[r] + k / 2, h, even, odd);
                    even = vfma(even, s, lo);
                    odd = vfma(odd, s, lo);
                    for (int i = 0; i < MR; ++i) {
                        const float *xb = xm + i * k_in + k + h * W;
                        acc[r][i] = vfma(even, vload(xb), acc[r][i]);
                        acc[r][i] = vfma(odd, vload(xb + 16), acc[r][i]);
                    }
                }
            }
        }
    } else if constexpr (KIND == 3) {
        const int64_t groups = p.groups_per_row;
        for (int64_t g = 0; g < groups; ++g) {
            vec part[NR][MR];
            for (int r = 0; r < NR; ++r)
                for (int i = 0; i < MR; ++i) part[r][i] = vzero();
            for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 32) {
                if ((k / 2) % 64 == 0)
                    for (int r = 0; r < NR; ++r) _mm_prefetch((const char *)rows[r] + ahead + k / 2, _MM_HINT_T0);
                for (int h = 0; h < HALF; ++h) {
                    for (int r = 0; r < NR; ++r) {
                        vec even, odd;
                        load_u4_half(rows[r] + k / 2, h, even, odd);
                        for (int i = 0; i < MR; ++i) {
                                const float *xb = xm + i * k_in + k + h * W;
                            part[r][i] = vfma(even, vload(xb), part[r][i]);
                            part[r][i] = vfma(odd, vload(xb + 16), part[r][i]);
                        }
                    }
                }
            }
            for (int r = 0; r < NR; ++r) {
                const int64_t pg = (n + r) * groups + g;
                const vec s = vset(p.scale[pg]);
                for (int i = 0; i < MR; ++i) {
                    acc[r][i] = vfma(part[r][i], s, acc[r][i]);
                    offset[r][i] += p.shift[pg] * xsum[i * groups + g];
                }
            }
        }
    } else {
        constexpr int BYTES = KIND == 2 ? 1 : 2;  // per weight
        for (int64_t k = 0; k < k_in; k += W) {
            if ((k * BYTES) % 64 == 0)
                for (int r = 0; r < NR; ++r) _mm_prefetch((const char *)rows[r] + ahead + k * BYTES, _MM_HINT_T0);
            for (int r = 0; r < NR; ++r) {
                vec wv = KIND == 0 ? load_bf16(rows[r] + 2 * k) : KIND == 1 ? load_fp16(rows[r] + 2 * k)
                                                                            : load_q8(rows[r] + k);
                for (int i = 0; i < MR; ++i) {
                    acc[r][i] = vfma(wv, vload(xm + i * k_in + k), acc[r][i]);
                }
            }
        }
    }
    for (int r = 0; r < NR; ++r) {
        for (int i = 0; i < MR; ++i) {
            float y = vsum(acc[r][i]);
            if (KIND == 2) y = y * p.scale[n + r] + p.shift[n + r] * xsum[i];
            if (KIND == 3) y += offset[r][i];
            out[i * n_out + r] = y;
        }
    }
}

// NR weight rows from n against all M x rows, MB at a time: the weight tile is read from
// memory once and from L1 for the further x rows.
template <int KIND, int NR>
inline void tile_all_rows(const Params &p, int64_t n, int64_t M, const float *xs, const float *sums,
                          int64_t sum_stride, int64_t k_in, float *ys, int64_t n_out) {
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const float *xm = xs + m0 * k_in, *xsm = sums + m0 * sum_stride;
        float *out = ys + m0 * n_out + n;
        switch (std::min<int64_t>(MB, M - m0)) {
        case 1: tile<KIND, NR, 1>(p, n, xm, xsm, k_in, out, n_out); break;
        case 2: tile<KIND, NR, 2>(p, n, xm, xsm, k_in, out, n_out); break;
        case 3: tile<KIND, NR, 3>(p, n, xm, xsm, k_in, out, n_out); break;
        default: tile<KIND, NR, MB>(p, n, xm, xsm, k_in, out, n_out);
        }
    }
}

// Rows [begin, end) of W against all M x rows: four weight rows at a time for a single x row
// (decode), two for batches, whose x rows then share each weight load.
template <int KIND>
void rows_for(const Params &p, int64_t begin, int64_t end, int64_t M, const float *xs, const float *sums,
              int64_t sum_stride, int64_t k_in, float *ys, int64_t n_out) {
    int64_t n = begin;
    if (M == 1)
        for (; n + 4 <= end; n += 4) tile_all_rows<KIND, 4>(p, n, M, xs, sums, sum_stride, k_in, ys, n_out);
    for (; n + 2 <= end; n += 2) tile_all_rows<KIND, 2>(p, n, M, xs, sums, sum_stride, k_in, ys, n_out);
    for (; n < end; ++n) tile_all_rows<KIND, 1>(p, n, M, xs, sums, sum_stride, k_in, ys, n_out);
}

}  // namespace

torch::Tensor deinterleave(const torch::Tensor &x) {
    auto m = x.size(0), k = x.size(1);
    auto blocks = x.reshape({m, k / 32, 16, 2});
    return blocks.transpose(2, 3).contiguous().reshape({m, k});
}

// x: [M, K] float32 contiguous times several weights of one kind, group layout and K (e.g. q,
// k and v): returns [M, sum of their N] float32, the outputs side by side. One call and one
// parallel region instead of one per weight.
torch::Tensor linear(torch::Tensor x, int64_t kind, std::vector<torch::Tensor> ws, std::vector<torch::Tensor> scales,
                     std::vector<torch::Tensor> shifts, int64_t group, int64_t groups_per_row,
                     std::vector<int64_t> n_outs, int64_t k_in) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == k_in,
                "x must be contiguous float32 [M, K]");
    TORCH_CHECK(k_in % 32 == 0, "K must be a multiple of 32");
    const size_t parts = ws.size();
    TORCH_CHECK(parts > 0 && scales.size() == parts && shifts.size() == parts && n_outs.size() == parts,
                "one scale, shift and output size per weight");
    std::vector<Params> ps;
    std::vector<int64_t> offsets(parts + 1, 0);
    for (size_t j = 0; j < parts; ++j) {
        TORCH_CHECK(ws[j].size(0) == n_outs[j], "weight rows must match the output size");
        ps.push_back(params(kind, ws[j], scales[j], shifts[j], group, groups_per_row));
        offsets[j + 1] = offsets[j] + n_outs[j];
    }
    const int64_t M = x.size(0), n_total = offsets[parts];
    auto y = torch::empty({M, n_total}, x.options());
    torch::Tensor xin = kind == 3 ? deinterleave(x) : x;
    // sum of x over each quantization group (int8: the whole row), for the shift term
    torch::Tensor xsum = kind == 2 ? x.sum(1) : kind == 3 ? x.view({M, groups_per_row, group}).sum(2).contiguous()
                                                          : torch::empty({0}, x.options());
    const float *xs = xin.data_ptr<float>(), *sums = xsum.data_ptr<float>();
    const int64_t sum_stride = kind == 3 ? groups_per_row : 1;
    float *ys = y.data_ptr<float>();
    at::parallel_for(0, n_total, 16, [&](int64_t begin, int64_t end) {
        for (size_t j = 0; j < parts; ++j) {
            const int64_t lo = std::max(begin, offsets[j]) - offsets[j];
            const int64_t hi = std::min(end, offsets[j + 1]) - offsets[j];
            if (lo >= hi) continue;
            float *yj = ys + offsets[j];
            switch (kind) {
            case 0: rows_for<0>(ps[j], lo, hi, M, xs, sums, sum_stride, k_in, yj, n_total); break;
            case 1: rows_for<1>(ps[j], lo, hi, M, xs, sums, sum_stride, k_in, yj, n_total); break;
            case 2: rows_for<2>(ps[j], lo, hi, M, xs, sums, sum_stride, k_in, yj, n_total); break;
            default: rows_for<3>(ps[j], lo, hi, M, xs, sums, sum_stride, k_in, yj, n_total);
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
            for (int64_t k = 0; k < k_in; k += W) vstore(os + (n - row0) * k_in + k, load_w(p, n, k));
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("linear", &linear, "[x W1^T | x W2^T | ...] with each W in its storage type");
    m.def("dequantize_rows", &dequantize_rows, "rows of W as float32");
}
