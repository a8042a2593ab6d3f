// The multiply-add ceilings of this CPU's cores, for the instructions flm's kernels issue, each in
// independent register chains (no memory): float32 FMA (the float32 tiles), vdpbf16ps (bf16
// prompts, prefill_bf16.cpp), vpmaddwd + vpaddd and VNNI's vpdpwssd (the int4 tiles' 16-bit
// sums). A kernel's rate (python bench/linear_kernels.py) read against its line tells how much of the
// units it uses. Instructions the CPU lacks are skipped. x86-64, GCC or Clang:
//
//     g++ -O2 -fopenmp bench/mac_peaks.cpp -o /tmp/mac_peaks && OMP_NUM_THREADS=2 /tmp/mac_peaks
#include <chrono>
#include <cstdio>
#include <omp.h>

namespace {

constexpr long ITERS = 50000000;

// 12 chains of one 512-bit instruction `op` (zmm0..11 += f(zmm14, zmm15)).
#define CHAINS12(op)                                                                                              \
    op " %%zmm15, %%zmm14, %%zmm0\n" op " %%zmm15, %%zmm14, %%zmm1\n" op " %%zmm15, %%zmm14, %%zmm2\n"            \
    op " %%zmm15, %%zmm14, %%zmm3\n" op " %%zmm15, %%zmm14, %%zmm4\n" op " %%zmm15, %%zmm14, %%zmm5\n"            \
    op " %%zmm15, %%zmm14, %%zmm6\n" op " %%zmm15, %%zmm14, %%zmm7\n" op " %%zmm15, %%zmm14, %%zmm8\n"            \
    op " %%zmm15, %%zmm14, %%zmm9\n" op " %%zmm15, %%zmm14, %%zmm10\n" op " %%zmm15, %%zmm14, %%zmm11\n"
#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", \
                 "xmm12", "xmm13", "xmm14", "xmm15", "cc"

void fma_zmm(long n) {
    asm volatile("vxorps %%zmm14, %%zmm14, %%zmm14\n vxorps %%zmm15, %%zmm15, %%zmm15\n1:\n" CHAINS12("vfmadd231ps")
                 "dec %0\n jnz 1b\n" : "+r"(n) : : CLOBBERS);
}

void dpbf16_zmm(long n) {
    asm volatile("vxorps %%zmm14, %%zmm14, %%zmm14\n vxorps %%zmm15, %%zmm15, %%zmm15\n1:\n" CHAINS12("vdpbf16ps")
                 "dec %0\n jnz 1b\n" : "+r"(n) : : CLOBBERS);
}

// what the int4 tiles issue per 16 weights and x row without VNNI: vpmaddwd then vpaddd (AVX2)
void maddwd_ymm(long n) {
    asm volatile("vpcmpeqd %%ymm15, %%ymm15, %%ymm15\n1:\n"
                 "vpmaddwd %%ymm15, %%ymm15, %%ymm0\n vpaddd %%ymm0, %%ymm8, %%ymm8\n"
                 "vpmaddwd %%ymm15, %%ymm15, %%ymm1\n vpaddd %%ymm1, %%ymm9, %%ymm9\n"
                 "vpmaddwd %%ymm15, %%ymm15, %%ymm2\n vpaddd %%ymm2, %%ymm10, %%ymm10\n"
                 "vpmaddwd %%ymm15, %%ymm15, %%ymm3\n vpaddd %%ymm3, %%ymm11, %%ymm11\n"
                 "vpmaddwd %%ymm15, %%ymm15, %%ymm4\n vpaddd %%ymm4, %%ymm12, %%ymm12\n"
                 "vpmaddwd %%ymm15, %%ymm15, %%ymm5\n vpaddd %%ymm5, %%ymm13, %%ymm13\n"
                 "vpmaddwd %%ymm15, %%ymm15, %%ymm6\n vpaddd %%ymm6, %%ymm14, %%ymm14\n"
                 "vpmaddwd %%ymm15, %%ymm15, %%ymm7\n vpaddd %%ymm7, %%ymm8, %%ymm8\n"
                 "dec %0\n jnz 1b\n" : "+r"(n) : : CLOBBERS);
}

// the same with VNNI (AVX512-VL): one vpdpwssd per 16 multiply-adds, 12 chains
void dpwssd_ymm(long n) {
    asm volatile("vpcmpeqd %%ymm15, %%ymm15, %%ymm15\n1:\n"
                 "vpdpwssd %%ymm15, %%ymm15, %%ymm0\n vpdpwssd %%ymm15, %%ymm15, %%ymm1\n"
                 "vpdpwssd %%ymm15, %%ymm15, %%ymm2\n vpdpwssd %%ymm15, %%ymm15, %%ymm3\n"
                 "vpdpwssd %%ymm15, %%ymm15, %%ymm4\n vpdpwssd %%ymm15, %%ymm15, %%ymm5\n"
                 "vpdpwssd %%ymm15, %%ymm15, %%ymm6\n vpdpwssd %%ymm15, %%ymm15, %%ymm7\n"
                 "vpdpwssd %%ymm15, %%ymm15, %%ymm8\n vpdpwssd %%ymm15, %%ymm15, %%ymm9\n"
                 "vpdpwssd %%ymm15, %%ymm15, %%ymm10\n vpdpwssd %%ymm15, %%ymm15, %%ymm11\n"
                 "dec %0\n jnz 1b\n" : "+r"(n) : : CLOBBERS);
}

struct Loop {
    const char *name;
    int available;  // __builtin_cpu_supports: nonzero when the CPU has it
    void (*run)(long);
    double macs_per_iter;  // multiply-adds per loop iteration, per thread
};

}  // namespace

int main() {
    __builtin_cpu_init();
    const Loop loops[] = {
        {"float32 FMA (zmm)", __builtin_cpu_supports("avx512f"), fma_zmm, 12 * 16},
        {"bf16 vdpbf16ps (zmm)", __builtin_cpu_supports("avx512bf16"), dpbf16_zmm, 12 * 32},
        {"int16 vpmaddwd+vpaddd (ymm)", __builtin_cpu_supports("avx2"), maddwd_ymm, 8 * 16},
        {"int16 vpdpwssd (ymm)", __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl"),
         dpwssd_ymm, 12 * 16},
    };
    std::printf("%d threads; G multiply-adds/s, three repeats\n", omp_get_max_threads());
    // untimed: threads started, clocks up (the first timed loop ran ~40% slow without)
    void (*warm_up)(long) = loops[0].available ? fma_zmm : maddwd_ymm;
#pragma omp parallel
    warm_up(ITERS);
    for (const Loop &loop : loops) {
        if (!loop.available) {
            std::printf("%-28s not on this CPU\n", loop.name);
            continue;
        }
        std::printf("%-28s", loop.name);
        for (int rep = 0; rep < 3; ++rep) {
            const auto start = std::chrono::steady_clock::now();
#pragma omp parallel
            loop.run(ITERS);
            const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            std::printf(" %7.1f", ITERS * loop.macs_per_iter * omp_get_max_threads() / seconds / 1e9);
        }
        std::printf("\n");
    }
}
