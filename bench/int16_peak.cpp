// The int16 multiply-add ceiling of this CPU's cores: vpmaddwd (16 multiply-adds) + vpaddd in 8
// independent register chains, the instruction pair flm's int4 tiles issue per 16 weights and
// input row. The int4 kernels' rate (python bench/kernels.py) read against this ceiling tells
// how much of the multiply-add units they use. AVX2, x86-64, GCC or Clang:
//
//     g++ -O2 -fopenmp bench/int16_peak.cpp -o /tmp/int16_peak && OMP_NUM_THREADS=2 /tmp/int16_peak
#include <chrono>
#include <cstdio>
#include <omp.h>

int main() {
    const long iters = 100000000;
    for (int rep = 0; rep < 3; ++rep) {
        const auto start = std::chrono::steady_clock::now();
#pragma omp parallel
        {
            long n = iters;
            asm volatile(
                "vpcmpeqd %%ymm15, %%ymm15, %%ymm15\n"
                "1:\n"
                "vpmaddwd %%ymm15, %%ymm15, %%ymm0\n vpaddd %%ymm0, %%ymm8, %%ymm8\n"
                "vpmaddwd %%ymm15, %%ymm15, %%ymm1\n vpaddd %%ymm1, %%ymm9, %%ymm9\n"
                "vpmaddwd %%ymm15, %%ymm15, %%ymm2\n vpaddd %%ymm2, %%ymm10, %%ymm10\n"
                "vpmaddwd %%ymm15, %%ymm15, %%ymm3\n vpaddd %%ymm3, %%ymm11, %%ymm11\n"
                "vpmaddwd %%ymm15, %%ymm15, %%ymm4\n vpaddd %%ymm4, %%ymm12, %%ymm12\n"
                "vpmaddwd %%ymm15, %%ymm15, %%ymm5\n vpaddd %%ymm5, %%ymm13, %%ymm13\n"
                "vpmaddwd %%ymm15, %%ymm15, %%ymm6\n vpaddd %%ymm6, %%ymm14, %%ymm14\n"
                "vpmaddwd %%ymm15, %%ymm15, %%ymm7\n vpaddd %%ymm7, %%ymm8, %%ymm8\n"
                "dec %0\n jnz 1b\n"
                : "+r"(n)
                :
                : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
                  "xmm12", "xmm13", "xmm14", "xmm15", "cc");
        }
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::printf("%d threads: %.1f G multiply-adds/s\n", omp_get_max_threads(),
                    (double)iters * 8 * 16 * omp_get_max_threads() / seconds / 1e9);
    }
}
