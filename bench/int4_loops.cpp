// Standalone inner loops of one x row against per-row int4 rows (the decode kernel's
// int4_row_sum, linear_simd.cpp), to tell whether a cheaper exact loop would stream int4 weights
// faster: "wssd", the kernel's (codes widened to 16 bits, vpdpwssd against x on the 16-bit grid)
// and "busd", x's 16-bit values split into a signed high and an unsigned low byte, each summed
// against the 4-bit codes with vpdpbusd (256 × high + low: the same int32 sums, fewer
// instructions per code), each in 256- and 512-bit forms, prefetching PF bytes ahead.
// Rows of K codes, N rows per layer, COPIES layers cycled (COPIES 1: weights stay in cache;
// enough copies for ~2 GB: from memory). GB/s of weights, the best of two runs of 0.5 s each.
// AVX-512 with VNNI, GCC:
//
//     g++ -O3 -fopenmp -mavx512f -mavx512bw -mavx512vl -mavx512vnni bench/int4_loops.cpp -o /tmp/int4_loops
//     OMP_NUM_THREADS=2 /tmp/int4_loops 2048 5632 180    # K N COPIES
#include <immintrin.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

template <int PF>
__m512i wssd_256(const uint8_t *row, const int16_t *xq, const int8_t *, const uint8_t *, int64_t K) {
    const __m256i low = _mm256_set1_epi16(0xF);
    __m256i part[8];
    for (auto &v : part) v = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 128) {
        _mm_prefetch((const char *)row + k / 2 + PF, _MM_HINT_T0);
        for (int j = 0; j < 4; ++j) {
            const int64_t c = k + 32 * j;
            const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + c / 2)));
            part[2 * j] = _mm256_dpwssd_epi32(part[2 * j], _mm256_srli_epi16(v, 4), _mm256_loadu_si256((const __m256i *)(xq + c)));
            part[2 * j + 1] = _mm256_dpwssd_epi32(part[2 * j + 1], _mm256_and_si256(v, low), _mm256_loadu_si256((const __m256i *)(xq + c + 16)));
        }
    }
    for (int j = 1; j < 8; ++j) part[0] = _mm256_add_epi32(part[0], part[j]);
    return _mm512_castsi256_si512(part[0]);
}

template <int PF>
__m512i wssd_512(const uint8_t *row, const int16_t *xq, const int8_t *, const uint8_t *, int64_t K) {
    const __m512i low = _mm512_set1_epi16(0xF);
    __m512i part[4];
    for (auto &v : part) v = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 128) {
        _mm_prefetch((const char *)row + k / 2 + PF, _MM_HINT_T0);
        for (int j = 0; j < 2; ++j) {
            const int64_t c = k + 64 * j;
            const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + c / 2)));
            part[2 * j] = _mm512_dpwssd_epi32(part[2 * j], _mm512_srli_epi16(v, 4), _mm512_loadu_si512(xq + c));
            part[2 * j + 1] = _mm512_dpwssd_epi32(part[2 * j + 1], _mm512_and_si512(v, low), _mm512_loadu_si512(xq + c + 32));
        }
    }
    return _mm512_add_epi32(_mm512_add_epi32(part[0], part[1]), _mm512_add_epi32(part[2], part[3]));
}

// x's bytes laid out per weight byte: the high-nibble element's at 2b, the low one's at 2b + 32
template <int PF>
__m512i busd_256(const uint8_t *row, const int16_t *, const int8_t *xh, const uint8_t *xl, int64_t K) {
    const __m256i low = _mm256_set1_epi8(0xF);
    __m256i hi[4], lo[4];
    for (int j = 0; j < 4; ++j) hi[j] = lo[j] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 128) {
        _mm_prefetch((const char *)row + k / 2 + PF, _MM_HINT_T0);
        for (int j = 0; j < 2; ++j) {
            const int64_t b = k / 2 + 32 * j;
            const __m256i v = _mm256_loadu_si256((const __m256i *)(row + b));
            const __m256i e = _mm256_and_si256(_mm256_srli_epi16(v, 4), low), o = _mm256_and_si256(v, low);
            hi[2 * j] = _mm256_dpbusd_epi32(hi[2 * j], e, _mm256_loadu_si256((const __m256i *)(xh + 2 * b)));
            lo[2 * j] = _mm256_dpbusd_epi32(lo[2 * j], _mm256_loadu_si256((const __m256i *)(xl + 2 * b)), e);
            hi[2 * j + 1] = _mm256_dpbusd_epi32(hi[2 * j + 1], o, _mm256_loadu_si256((const __m256i *)(xh + 2 * b + 32)));
            lo[2 * j + 1] = _mm256_dpbusd_epi32(lo[2 * j + 1], _mm256_loadu_si256((const __m256i *)(xl + 2 * b + 32)), o);
        }
    }
    for (int j = 1; j < 4; ++j) hi[0] = _mm256_add_epi32(hi[0], hi[j]), lo[0] = _mm256_add_epi32(lo[0], lo[j]);
    return _mm512_castsi256_si512(_mm256_add_epi32(_mm256_slli_epi32(hi[0], 8), lo[0]));
}

template <int PF>
__m512i busd_512(const uint8_t *row, const int16_t *, const int8_t *xh, const uint8_t *xl, int64_t K) {
    const __m512i low = _mm512_set1_epi8(0xF);
    __m512i hi[2], lo[2];
    hi[0] = hi[1] = lo[0] = lo[1] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 128) {
        _mm_prefetch((const char *)row + k / 2 + PF, _MM_HINT_T0);
        const int64_t b = k / 2;
        const __m512i v = _mm512_loadu_si512(row + b);
        const __m512i e = _mm512_and_si512(_mm512_srli_epi16(v, 4), low), o = _mm512_and_si512(v, low);
        hi[0] = _mm512_dpbusd_epi32(hi[0], e, _mm512_loadu_si512(xh + 2 * b));
        lo[0] = _mm512_dpbusd_epi32(lo[0], _mm512_loadu_si512(xl + 2 * b), e);
        hi[1] = _mm512_dpbusd_epi32(hi[1], o, _mm512_loadu_si512(xh + 2 * b + 64));
        lo[1] = _mm512_dpbusd_epi32(lo[1], _mm512_loadu_si512(xl + 2 * b + 64), o);
    }
    return _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(hi[0], hi[1]), 8), _mm512_add_epi32(lo[0], lo[1]));
}

using Loop = __m512i (*)(const uint8_t *, const int16_t *, const int8_t *, const uint8_t *, int64_t);

}  // namespace

int main(int argc, char **argv) {
    if (argc < 4) return std::fprintf(stderr, "usage: int4_loops K N COPIES (K a multiple of 128)\n"), 2;
    const int64_t K = std::atoll(argv[1]), N = std::atoll(argv[2]), copies = std::atoll(argv[3]);
    const int64_t layer = N * K / 2;
    std::vector<uint8_t> w(layer * copies);
#pragma omp parallel for
    for (int64_t i = 0; i < (int64_t)w.size(); ++i) w[i] = uint8_t(i * 2654435761u >> 13);
    // 2 K bytes each for the split x: generous, the loops index up to 2 * (K / 2 + 64)
    std::vector<int16_t> xq(K);
    std::vector<int8_t> xh(2 * K + 128);
    std::vector<uint8_t> xl(2 * K + 128);
    for (int64_t i = 0; i < K; ++i) xq[i] = int16_t(i * 7919 % 65535 - 32767);
    std::vector<int32_t> y(N);
    const struct { const char *name; Loop loop; } loops[] = {
        {"wssd 256, PF 512", wssd_256<512>},   {"wssd 256, PF 2048", wssd_256<2048>},
        {"wssd 512, PF 512", wssd_512<512>},   {"wssd 512, PF 2048", wssd_512<2048>}, {"busd 256, PF 512", busd_256<512>},
        {"busd 256, PF 2048", busd_256<2048>}, {"busd 512, PF 512", busd_512<512>},   {"busd 512, PF 2048", busd_512<2048>},
    };
    std::printf("K %lld, N %lld, %lld copies (%.0f MB of int4 rows)\n", (long long)K, (long long)N, (long long)copies,
                double(w.size()) / 1e6);
    for (const auto &l : loops) {
        double best = 0;
        for (int run = 0; run < 2; ++run) {
            const auto start = std::chrono::steady_clock::now();
            int64_t layers = 0;
            double seconds;
            do {
                const uint8_t *base = w.data() + (layers % copies) * layer;
#pragma omp parallel for schedule(static)
                for (int64_t n = 0; n < N; ++n)
                    y[n] = _mm512_reduce_add_epi32(l.loop(base + n * K / 2, xq.data(), xh.data(), xl.data(), K));
                ++layers;
                seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            } while (seconds < 0.5);
            best = std::max(best, double(layers * layer) / seconds / 1e9);
        }
        std::printf("%-20s %6.1f GB/s\n", l.name, best);
    }
}
