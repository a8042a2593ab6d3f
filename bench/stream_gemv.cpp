// Standalone float16 GEMV (one x row, 2048-column rows, 5632-row layers over ~500 MB, OpenMP
// static halves unless noted), to tell what limits flm's one-row decode streaming: 4 KB vs 2 MB
// pages (anonymous memory), a file's map (FILE: any file over 500 MB, e.g. a 1.1B .flm),
// software prefetch 1 KB ahead, and dynamic chunks of 64 rows. GB/s of weights, ten rounds.
// AVX-512 (F16C, FMA), GCC:
//
//     g++ -O2 -mavx512f -mavx512bw -mavx512vl -mf16c -mfma -fopenmp bench/stream_gemv.cpp -o /tmp/stream_gemv
//     OMP_NUM_THREADS=2 /tmp/stream_gemv FILE
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <omp.h>
#include <vector>
#include <cstdint>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
const int64_t K = 2048, N = 5632 * 22;  // ~500 MB fp16
template <int AHEAD>
void gemv(const uint16_t *w, const float *x, float *y, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
        const uint16_t *row = w + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; k += 64) {
            if (AHEAD) {
                _mm_prefetch((const char *)(row + k) + AHEAD, _MM_HINT_T0);
                _mm_prefetch((const char *)(row + k) + AHEAD + 64, _MM_HINT_T0);
            }
            a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + k))), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + k + 16))), _mm512_loadu_ps(x + k + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + k + 32))), _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + k + 48))), _mm512_loadu_ps(x + k + 48), a3);
        }
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
}
template <int AHEAD>
double run(const uint16_t *w, const float *x, float *y, int mode, int64_t layer_rows) {
    auto t = std::chrono::steady_clock::now();
    int reps = 3;
    for (int r = 0; r < reps; ++r)
        for (int64_t l0 = 0; l0 < N; l0 += layer_rows) {
            int64_t l1 = std::min(N, l0 + layer_rows);
            if (mode == 0) {
#pragma omp parallel
                { int t = omp_get_thread_num(), T = omp_get_num_threads(); int64_t per = (l1 - l0 + T - 1) / T;
                  int64_t a = l0 + t * per, b = std::min(l1, a + per); if (a < b) gemv<AHEAD>(w, x, y, a, b); }
            } else {
#pragma omp parallel for schedule(dynamic, 1)
                for (int64_t n = l0; n < l1; n += 64) gemv<AHEAD>(w, x, y, n, std::min(l1, n + 64));
            }
        }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    return reps * N * K * 2.0 / s / 1e9;
}
int main(int argc, char **argv) {
    size_t bytes = N * K * 2;
    uint16_t *a4 = (uint16_t *)aligned_alloc(2 << 20, bytes);
    uint16_t *ah = (uint16_t *)aligned_alloc(2 << 20, bytes);
    madvise(ah, bytes, MADV_HUGEPAGE);
    for (size_t i = 0; i < N * K; ++i) { a4[i] = 0x3c00 + (i & 255); ah[i] = a4[i]; }
    int fd = argc > 1 ? open(argv[1], O_RDONLY) : -1;
    if (fd < 0 || lseek(fd, 0, SEEK_END) < (off_t)(bytes + (1 << 20))) {
        fprintf(stderr, "usage: stream_gemv FILE (a readable file of at least %zu MB)\n", (bytes >> 20) + 1);
        return 1;
    }
    uint16_t *f = (uint16_t *)mmap(nullptr, bytes + (1 << 20), PROT_READ, MAP_SHARED, fd, 0);
    madvise(f, bytes + (1 << 20), MADV_HUGEPAGE);
    madvise(f, bytes + (1 << 20), 22);  // MADV_POPULATE_READ
    f += (1 << 19);
    std::vector<float> x(K, 0.5f), y(N);
    volatile uint64_t s = 0; for (size_t i = 0; i < N * K; i += 2048) s += f[i];
    for (int rep = 0; rep < 10; ++rep) {
        printf("anon-4k %.1f anon-2m %.1f file %.1f file-pf1k %.1f file-chunks64 %.1f\n",
               run<0>(a4, x.data(), y.data(), 0, 5632), run<0>(ah, x.data(), y.data(), 0, 5632),
               run<0>(f, x.data(), y.data(), 0, 5632), run<1024>(f, x.data(), y.data(), 0, 5632),
               run<0>(f, x.data(), y.data(), 1, 5632));
        fflush(stdout);
    }
}
