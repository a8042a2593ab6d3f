// Prompts on CPUs with AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and later): x rounded once to
// bfloat16, weights as bfloat16 (bf16 rows in place; int8 codes, exact in bf16; int4 values
// dequantized with fastllm's formula, then rounded), multiplied by vdpbf16ps, which adds 32
// bf16 products into 16 float32 lanes per instruction, twice the multiply-adds of float32 FMA
// (bench/mac_peaks.cpp measures both peaks). Sums and outputs stay float32
// (torch's bf16 GEMM, and transformers' bf16 model, round outputs to bf16 too). fastllm itself
// rounds x as well (to float16 for 16-bit weights, to 8 bits for int8/int4). float16 weights
// keep the float32 kernels: bf16 would drop three bits of each weight.
//
// Blocked as rows_blocked in linear_simd.cpp: NC weight rows x KC columns (bf16: 192 KB, in L2)
// meet every MR-row tile of x (KC columns of it, 24 KB, in L1); NR x MR accumulators (6 x rows
// per tile beat 4: bench/HISTORY.md, "Prompts in bfloat16 dot products").
#include "flm_kernels.h"

#if defined(__AVX512BF16__)
#include "simd.h"
#include "weights.h"
#endif

namespace flm {

#if defined(__AVX512BF16__)

namespace {

constexpr int64_t NC = 48, KC = 2048;  // a block: weight rows x columns
constexpr int MR = 6, NR = 4;          // a tile: x rows x weight rows

// 32 float32 as bf16, rounded to nearest even.
inline __m512i to_bf16(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }

// x [M, K] rounded to bf16 into xb, and each row's sum of the rounded values (the int8 shift term).
void round_x(const float *x, int64_t M, int64_t k_in, uint16_t *xb, float *sums) {
    for (int64_t i = 0; i < M; ++i) {
        __m512 total = _mm512_setzero_ps();
        for (int64_t k = 0; k < k_in; k += 32) {
            const __m512i v = to_bf16(_mm512_loadu_ps(x + i * k_in + k), _mm512_loadu_ps(x + i * k_in + k + 16));
            _mm512_storeu_si512(xb + i * k_in + k, v);
            total = _mm512_dpbf16_ps(total, (__m512bh)v, (__m512bh)_mm512_set1_epi16(0x3F80));  // times 1.0
        }
        sums[i] = _mm512_reduce_add_ps(total);
    }
}

// Columns [k0, k0 + kc) of weight row n as bf16 into out: int8 codes as stored (0..255, exact),
// int4 values w = lo + scale * q rounded.
void widen_row(const Params &p, int64_t n, int64_t k0, int64_t kc, uint16_t *out) {
    const uint8_t *row = p.w + n * p.row_bytes;
    for (int64_t k = 0; k < kc; k += 32) {
        const __m512i v = p.kind == INT8 ? to_bf16(load_u8(row + k0 + k), load_u8(row + k0 + k + 16))
                                      : to_bf16(load_w(p, n, k0 + k), load_w(p, n, k0 + k + 16));
        _mm512_storeu_si512(out + k, v);
    }
}

// R weight rows against C x rows (x rows x_stride apart) over kc columns: out[i * n_out + r] is
// set to the sum (carry: the sum is added to it).
template <int R, int C>
inline void tile(const uint16_t *const *w, const uint16_t *x, int64_t x_stride, int64_t kc, float *out, int64_t n_out,
                 bool carry) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < C; ++i) acc[r][i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k += 32) {
        __m512bh wv[R];
        for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w[r] + k);
        for (int i = 0; i < C; ++i) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * x_stride + k);
            for (int r = 0; r < R; ++r) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], wv[r], xv);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < C; ++i) {
            const float y = _mm512_reduce_add_ps(acc[r][i]);
            float &o = out[i * n_out + r];
            o = carry ? o + y : y;
        }
}

// Weight rows [begin, end) of one part against all M rows of xb; outputs to ys (row stride n_out).
void rows_bf16(const Params &p, int64_t begin, int64_t end, int64_t M, const uint16_t *xb, const float *xsums,
               int64_t k_in, float *ys, int64_t n_out) {
    thread_local std::vector<uint16_t> block;
    block.resize(NC * KC);
    const uint16_t *rows[NC];
    for (int64_t n0 = begin; n0 < end; n0 += NC) {
        const int64_t nb = std::min(NC, end - n0);
        for (int64_t k0 = 0; k0 < k_in; k0 += KC) {
            const int64_t kc = std::min(KC, k_in - k0);
            for (int64_t r = 0; r < nb; ++r) {
                if (p.kind == BF16) {
                    rows[r] = (const uint16_t *)(p.w + (n0 + r) * p.row_bytes) + k0;
                } else {
                    widen_row(p, n0 + r, k0, kc, block.data() + r * kc);
                    rows[r] = block.data() + r * kc;
                }
            }
            for (int64_t m0 = 0; m0 < M; m0 += MR) {
                const int64_t mr = std::min<int64_t>(MR, M - m0);
                float *out = ys + m0 * n_out + n0;
                const uint16_t *x = xb + m0 * k_in + k0;
                with_row_count<MR>(mr, [&](auto c) {
                    constexpr int C = decltype(c)::value;
                    int64_t r = 0;
                    for (; r + NR <= nb; r += NR) tile<NR, C>(rows + r, x, k_in, kc, out + r, n_out, k0 > 0);
                    for (; r < nb; ++r) tile<1, C>(rows + r, x, k_in, kc, out + r, n_out, k0 > 0);
                });
            }
        }
        if (p.kind == INT8)
            for (int64_t i = 0; i < M; ++i)
                for (int64_t n = n0; n < n0 + nb; ++n) {
                    float &y = ys[i * n_out + n];
                    y = int8_output(p, n, y, xsums[i]);
                }
    }
}

}  // namespace

bool has_prefill_bf16() { return true; }

void linear_bf16(const std::vector<Params> &ps, int64_t M, const float *x, int64_t k_in, float *ys) {
    TORCH_CHECK(ps[0].kind == BF16 || ps[0].kind == INT8 || ps[0].kind == INT4, "bfloat16 prefill takes bf16, int8 or int4");
    thread_local std::vector<uint16_t> xb;
    thread_local std::vector<float> sums;
    xb.resize(M * k_in);
    sums.resize(M);
    round_x(x, M, k_in, xb.data(), sums.data());
    int64_t n_total = 0;
    for (const Params &p : ps) n_total += p.n;
    // this thread's scratch, by pointer: the name would mean each worker's own thread_local
    const uint16_t *xr = xb.data();
    const float *xsums = sums.data();
    parallel_parts(ps, ys, 0, [&](size_t j, int64_t lo, int64_t hi, float *yj) {
        rows_bf16(ps[j], lo, hi, M, xr, xsums, k_in, yj, n_total);
    });
}

#else  // built without AVX512-BF16: prompts take the float32 kernels

bool has_prefill_bf16() { return false; }

void linear_bf16(const std::vector<Params> &, int64_t, const float *, int64_t, float *) {
    TORCH_CHECK(false, "this build of the kernels has no bfloat16 prefill");
}

#endif

}  // namespace flm
