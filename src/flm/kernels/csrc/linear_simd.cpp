// flm's CPU linear kernels: y[M, N] = x[M, K] (float32) times W[N, K]^T, with W in its .flm
// storage type, widened a vector at a time to float32 with fastllm's formulas and accumulated in
// float32 (int4: codes times x rounded to 16 bits, summed in int32, see quant.round_input_int16).
// Every call reads each weight from memory once: a few x rows (decode) per pass over a weight
// tile, a prompt in cache-sized blocks (rows_blocked, rows_widened); prompts past the caller's
// limit use `dequantize_rows` and a float32 GEMM instead.
//
// One source, two instruction sets: compiled with -mavx512f it uses 16-lane AVX-512 vectors,
// otherwise 8-lane AVX2 (+FMA, F16C). Only the primitives in simd.h differ; the loops are shared.
//
// Weight kinds: see kinds.h.
#include "flm_kernels.h"
#include "simd.h"
#include "weights.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace flm {
namespace {

constexpr int MB = 4;  // x rows per pass over a weight tile
constexpr int64_t NC = 48, KC = 2048;  // a prefill block: weight rows x columns (see rows_blocked)
constexpr int64_t KCW = 512;           // columns of a widened quantized block (rows_widened)
constexpr int64_t BLOCKED_ABOVE = 8;  // more x rows than this take rows_blocked

// Columns [begin, end) of K a tile sums; `carry`: add the raw sum the earlier spans left in the
// output; `finish`: this is the last span, apply the scales and shifts.
struct Span {
    int64_t begin, end;
    bool carry, finish;
};

// A template-only kind: INT4 with 32-element groups known at compile time, so that the
// per-group loop unrolls (SmolLM2-style Q4_1 group size; the runtime-group loop was markedly
// slower there: bench/HISTORY.md, "Where the time goes").
constexpr int INT4_G32 = 5;
template <int KIND>
constexpr bool is_int4 = KIND == INT4 || KIND == INT4_G32;

constexpr int HALF = 16 / W;  // vectors per 16 even (or odd) int4 values

// The x rows a tile reads, from row m0 on: float32, or for int4 x rounded to 16 bits (xq, one
// scale per row) in deinterleaved 32-blocks; and sum(x) per group (int8: per row).
struct Input {
    const float *x;
    const int16_t *xq;
    const float *xscale;
    const float *sums;
    int64_t sum_stride;
    Input from(int64_t m0, int64_t k_in) const {
        return {x ? x + m0 * k_in : nullptr, xq ? xq + m0 * k_in : nullptr, xscale ? xscale + m0 : nullptr,
                sums + m0 * sum_stride, sum_stride};
    }
};

// 8 int32 sums as float32 vector lanes (AVX-512 builds hold them in the low half).
inline vec widen_i32(__m256i v) {
#if defined(__AVX512F__)
    return _mm512_insertf32x8(_mm512_setzero_ps(), _mm256_cvtepi32_ps(v), 0);
#else
    return _mm256_cvtepi32_ps(v);
#endif
}

// The int32 sums of NR int4 rows against MR x rows over columns [c, stop) (multiples of 32),
// added into part: codes times x rounded to 16 bits (xq), summed exactly (dot_add_i16: 16
// multiply-adds per instruction). x's 32-blocks were reordered evens-then-odds
// (`round_int4_input`): the high nibbles pair with the even elements.
template <int NR, int MR, bool PREFETCH>
inline void int4_block_sums(const uint8_t *const (&rows)[NR], int64_t ahead, const int16_t *xq, int64_t k_in,
                            int64_t c, int64_t stop, __m256i (&part)[NR][MR]) {
    const __m256i low = _mm256_set1_epi16(0xF);
    for (int64_t k = c; k < stop; k += 32) {
        if (PREFETCH && (k / 2) % 64 == 0)
            for (int r = 0; r < NR; ++r) _mm_prefetch((const char *)rows[r] + ahead + k / 2, _MM_HINT_T0);
        for (int r = 0; r < NR; ++r) {
            const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(rows[r] + k / 2)));
            const __m256i even = _mm256_srli_epi16(v, 4), odd = _mm256_and_si256(v, low);
            for (int i = 0; i < MR; ++i) {
                const int16_t *xb = xq + i * k_in + k;
                part[r][i] = dot_add_i16(part[r][i], even, _mm256_loadu_si256((const __m256i *)xb));
                part[r][i] = dot_add_i16(part[r][i], odd, _mm256_loadu_si256((const __m256i *)(xb + 16)));
            }
        }
    }
}

#if defined(__AVX512F__)
// int4_block_sums for NR = 2 * PAIRS rows and MR x rows with two rows in each 512-bit vector,
// row 2p + h's codes in half h of pair p, and each x block broadcast to both halves: one
// multiply-add instruction and one x load per pair and x row where the 256-bit tile issues two
// of each, and the codes unpacked once for all MR x rows. Each half's int32 lanes are
// int4_block_sums' lanes exactly, so a batch's rows still equal each row alone bit for bit.
template <int PAIRS, int MR>
inline void int4_pair_sums(const uint8_t *const (&rows)[2 * PAIRS], int64_t ahead, const int16_t *xq, int64_t k_in,
                           int64_t c, int64_t stop, __m256i (&part)[2 * PAIRS][MR]) {
    const __m512i low = _mm512_set1_epi16(0xF);
    __m512i sums[PAIRS][MR];
    for (int q = 0; q < PAIRS; ++q)
        for (int i = 0; i < MR; ++i) sums[q][i] = _mm512_setzero_si512();
    for (int64_t k = c; k < stop; k += 32) {
        if ((k / 2) % 64 == 0)
            for (int r = 0; r < 2 * PAIRS; ++r) _mm_prefetch((const char *)rows[r] + ahead + k / 2, _MM_HINT_T0);
        __m512i even[PAIRS], odd[PAIRS];
        for (int q = 0; q < PAIRS; ++q) {
            const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu2_m128i((const __m128i *)(rows[2 * q + 1] + k / 2),
                                                                       (const __m128i *)(rows[2 * q] + k / 2)));
            even[q] = _mm512_srli_epi16(v, 4);
            odd[q] = _mm512_and_si512(v, low);
        }
        for (int i = 0; i < MR; ++i) {
            const int16_t *xb = xq + i * k_in + k;
            const __m512i xe = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xb));
            const __m512i xo = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xb + 16)));
            for (int q = 0; q < PAIRS; ++q)
                sums[q][i] = dot_add_i16_512(dot_add_i16_512(sums[q][i], even[q], xe), odd[q], xo);
        }
    }
    for (int q = 0; q < PAIRS; ++q)
        for (int i = 0; i < MR; ++i) {
            part[2 * q][i] = _mm256_add_epi32(part[2 * q][i], _mm512_castsi512_si256(sums[q][i]));
            part[2 * q + 1][i] = _mm256_add_epi32(part[2 * q + 1][i], _mm512_extracti64x4_epi64(sums[q][i], 1));
        }
}
#endif

// for_int4_blocks calls body(c, stop, g) for the blocks of columns [begin, end) (multiples of 32)
// that one int32 sum covers: a whole group (the usual 32-128 codes), or pieces of at most 4096
// codes of a longer group (the sums stay below 2^31), never across a group's end.
template <int KIND, typename Body>
inline void for_int4_blocks(const Params &p, int64_t begin, int64_t end, Body &&body) {
    if constexpr (KIND == INT4_G32) {  // groups of 32 known at compile time: one block per group
        for (int64_t c = begin; c < end; c += 32) body(c, c + 32, c / 32);
    } else {
        for (int64_t g = begin / p.group; g * p.group < end; ++g) {
            const int64_t g_end = std::min((g + 1) * p.group, end);
            for (int64_t c = std::max(g * p.group, begin); c < g_end; c += 4096) body(c, std::min(c + 4096, g_end), g);
        }
    }
}

// One tile: NR weight rows from n against MR x rows, written to out[i * n_out + r]. Both are
// compile-time so that the NR x MR accumulators live in registers; several independent ones
// keep the FMA units busy even for a single x row (one would wait on FMA latency every step).
// Quantized kinds multiply the integer codes with x and apply each row's (or group's) scale
// once at the end: y = scale * sum(q x) + shift * sum(x), with sum(x) per group in `xsum`
// [MR, K / group].
// int8 codes are read as stored (0..255, one instruction fewer than q - 128, which decode reads
// faster), so their shift term is shift - 128 * scale.
// int4 codes go 32 at a time against x whose 32-blocks were reordered evens-then-odds
// (`round_int4_input`): the high nibbles pair with the even elements.
template <int KIND, int NR, int MR, bool PREFETCH>
inline void tile(const Params &p, int64_t n, const Input &in, int64_t k_in, const Span &ks, float *out, int64_t n_out) {
    const float *xm = in.x, *xsum = in.sums;
    vec acc[NR][MR];
    for (int r = 0; r < NR; ++r)
        for (int i = 0; i < MR; ++i) acc[r][i] = vzero();
    const uint8_t *rows[NR];
    for (int r = 0; r < NR; ++r) rows[r] = p.w + (n + r) * p.row_bytes;
    // Rows are short (a few KB) and read NR at a time, too little for the hardware prefetcher
    // to ramp up: fetch the next tile's rows while this one computes, a cache line at a time
    // (PREFETCH; not in rows_blocked, whose blocks are read from L2, where it cost time).
    const int64_t ahead = NR * p.row_bytes;
    if constexpr (is_int4<KIND>) {
        // int32 sums (int4_block_sums), then scaled per group in float32
        for_int4_blocks<KIND>(p, ks.begin, ks.end, [&](int64_t c, int64_t stop, int64_t g) {
            __m256i part[NR][MR];
            for (int r = 0; r < NR; ++r)
                for (int i = 0; i < MR; ++i) part[r][i] = _mm256_setzero_si256();
            int4_block_sums<NR, MR, PREFETCH>(rows, ahead, in.xq, k_in, c, stop, part);
            for (int r = 0; r < NR; ++r) {
                const vec s = vset(p.scale[(n + r) * p.groups_per_row + g]);
                for (int i = 0; i < MR; ++i) acc[r][i] = vfma(widen_i32(part[r][i]), s, acc[r][i]);
            }
        });
    } else {
        constexpr int BYTES = KIND == INT8 ? 1 : KIND == FP32 ? 4 : 2;  // per weight
        for (int64_t k = ks.begin; k < ks.end; k += W) {
            if (PREFETCH && (k * BYTES) % 64 == 0)
                for (int r = 0; r < NR; ++r) _mm_prefetch((const char *)rows[r] + ahead + k * BYTES, _MM_HINT_T0);
            vec wv[NR];
            for (int r = 0; r < NR; ++r) wv[r] = load_stored(KIND, rows[r], k);
            for (int i = 0; i < MR; ++i) {  // each x vector loaded once, for all NR rows
                const vec xv = vload(xm + i * k_in + k);
                for (int r = 0; r < NR; ++r) acc[r][i] = vfma(wv[r], xv, acc[r][i]);
            }
        }
    }
    for (int r = 0; r < NR; ++r) {
        for (int i = 0; i < MR; ++i) {
            float y = vsum(acc[r][i]);
            float &o = out[i * n_out + r];
            if (ks.carry) y += o;
            if (ks.finish) {
                if (KIND == INT8) y = int8_output(p, n + r, y, xsum[i]);
                if constexpr (is_int4<KIND>)  // xq's scale; the groups' shift terms, one dot product per row
                    y = y * in.xscale[i] + dot(p.shift + (n + r) * p.groups_per_row, xsum + i * p.groups_per_row, p.groups_per_row);
            }
            o = y;
        }
    }
}

// Tiles of NR weight rows from n against the x rows m0..m0 + MB (fewer at the end of M).
template <int KIND, int NR, bool PREFETCH>
inline void tile_rows(const Params &p, int64_t n, int64_t m0, int64_t M, const Input &xs, int64_t k_in, const Span &ks,
                      float *ys, int64_t n_out) {
    const Input xm = xs.from(m0, k_in);
    float *out = ys + m0 * n_out + n;
    with_row_count<MB>(std::min<int64_t>(MB, M - m0), [&](auto mr) {
        tile<KIND, NR, decltype(mr)::value, PREFETCH>(p, n, xm, k_in, ks, out, n_out);
    });
}

// One x row against rows [begin, end) of W, one weight row after the other (NR at a time for
// long rows, see rows_in_order) with eight accumulators along each: the weights are read in
// memory order, a single stream. The tiles below read eight rows side by side, eight streams
// that are each too short (a SmolLM2 row of 576 float16 is 18 cache lines) for the hardware
// prefetcher. In order wins at every row length for 16-bit and int8 rows (int8 with the 1 KB
// prefetch below); float32 rows keep the tiles past 1024 columns, where in order lost
// (bench/HISTORY.md, "Short rows read in order").
inline bool reads_in_order(int kind, int64_t M, int64_t k_in) { return M == 1 && (kind != FP32 || k_in <= 1024); }
constexpr int64_t IN_ORDER_STEP = 64;  // columns per step of rows_in_order (its chains times W)

template <int KIND, int NR>
void rows_in_order_by(const Params &p, int64_t begin, int64_t end, const Input &xs, int64_t k_in, float *ys) {
    // independent sums, FMA latency hidden: 8 of AVX2's 8 lanes; 4 of AVX-512's 16 (8 of them
    // streamed slower on Zen 4)
    constexpr int CHAINS = IN_ORDER_STEP / W;
    // 16-bit and int8 rows also fetch 1 KB ahead, a cache line per 64 bytes read, which streamed
    // faster; not float16 rows on AVX-512, which (Zen 4) stream faster on the hardware
    // prefetcher alone (bench/HISTORY.md, "Streaming weights on Zen 4").
    constexpr bool PREFETCH = KIND != FP32 && !(KIND == FP16 && W == 16);
    constexpr int64_t AHEAD = 1024;
    constexpr int64_t BYTES = KIND == INT8 ? 1 : 2;  // per weight (float32 rows are neither prefetched nor split)
    constexpr int SPLIT = split_loads(KIND);  // vectors (chains) per load, x reordered to match
    for (int64_t n = begin; n < end; n += NR) {
        const uint8_t *rows[NR];
        vec acc[NR][CHAINS];
        for (int r = 0; r < NR; ++r) {
            rows[r] = p.w + (n + r) * p.row_bytes;
            for (int c = 0; c < CHAINS; ++c) acc[r][c] = vzero();
        }
        int64_t k = 0;
        for (; k + CHAINS * W <= k_in; k += CHAINS * W) {
            if constexpr (PREFETCH)
                for (int r = 0; r < NR; ++r)
                    for (int64_t b = 0; b < CHAINS * W * BYTES; b += 64)
                        _mm_prefetch((const char *)rows[r] + AHEAD + BYTES * k + b, _MM_HINT_T0);
            for (int c = 0; c < CHAINS; c += SPLIT) {
                if constexpr (SPLIT > 1) {
                    vec w[NR][SPLIT];
                    for (int r = 0; r < NR; ++r) load_split(KIND, rows[r] + BYTES * (k + c * W), w[r]);
                    for (int s = 0; s < SPLIT; ++s) {
                        const vec xv = vload(xs.x + k + (c + s) * W);
                        for (int r = 0; r < NR; ++r) acc[r][c + s] = vfma(w[r][s], xv, acc[r][c + s]);
                    }
                } else {
                    const vec xv = vload(xs.x + k + c * W);
                    for (int r = 0; r < NR; ++r) acc[r][c] = vfma(load_stored(KIND, rows[r], k + c * W), xv, acc[r][c]);
                }
            }
        }
        for (int r = 0; r < NR; ++r) {
            // the tail (shorter than the chains), x in element order
            for (int64_t t = k, c = 0; t < k_in; t += W, ++c) acc[r][c] = vfma(load_stored(KIND, rows[r], t), vload(xs.x + t), acc[r][c]);
            for (int c = 1; c < CHAINS; ++c) acc[r][0] = vadd(acc[r][0], acc[r][c]);
            const float y = vsum(acc[r][0]);
            ys[n + r] = KIND == INT8 ? int8_output(p, n + r, y, xs.sums[0]) : y;
        }
    }
}

// Rows longer than 5120 columns go four at a time, each x vector loaded once for the four: past
// ~20 KB, an x row in float32 no longer stays in L1 beside the weights streaming through, so one
// row at a time re-read all of x from L2 per row, two x cache lines per weight line (bf16), and
// such rows streamed markedly slower than rows of 2048-4096 (bench/HISTORY.md, "Long rows").
// Each row keeps its own chains, so its sum is bit for bit the one-row walk's. Four rows beat
// two; at 5120 columns they did not yet gain, so they start past it.
constexpr int64_t SHARED_X_MIN_COLS = 5121;
constexpr int SHARED_X_ROWS = 4;

template <int KIND>
void rows_in_order(const Params &p, int64_t begin, int64_t end, const Input &xs, int64_t k_in, float *ys) {
    int64_t n = begin;
    if (k_in >= SHARED_X_MIN_COLS) {
        n = begin + (end - begin) / SHARED_X_ROWS * SHARED_X_ROWS;
        rows_in_order_by<KIND, SHARED_X_ROWS>(p, begin, n, xs, k_in, ys);
    }
    rows_in_order_by<KIND, 1>(p, n, end, xs, k_in, ys);
}

// The int32 sums of one int4 row against one x row over columns [c, stop) (multiples of 32):
// int4_block_sums for a single row, 128 codes (a cache line) per pass in eight chains, so that
// one row keeps the multiply-add units busy (vpdpwssd's latency); integer sums, so the chains add
// up to int4_block_sums' lanes exactly. Fetches 512 bytes ahead, a cache line per pass.
inline __m256i int4_row_sum(const uint8_t *row, const int16_t *xq, int64_t c, int64_t stop) {
    const __m256i low = _mm256_set1_epi16(0xF);
    __m256i part[8];
    for (auto &v : part) v = _mm256_setzero_si256();
    auto step = [&](int64_t k, __m256i &even_sum, __m256i &odd_sum) {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + k / 2)));
        even_sum = dot_add_i16(even_sum, _mm256_srli_epi16(v, 4), _mm256_loadu_si256((const __m256i *)(xq + k)));
        odd_sum = dot_add_i16(odd_sum, _mm256_and_si256(v, low), _mm256_loadu_si256((const __m256i *)(xq + k + 16)));
    };
    int64_t k = c;
    for (; k + 128 <= stop; k += 128) {
        _mm_prefetch((const char *)row + k / 2 + 512, _MM_HINT_T0);
        for (int j = 0; j < 4; ++j) step(k + 32 * j, part[2 * j], part[2 * j + 1]);
    }
    for (; k < stop; k += 32) {  // a block shorter than a pass (groups of 32 or 64)
        if ((k / 2) % 64 == 0) _mm_prefetch((const char *)row + k / 2 + 512, _MM_HINT_T0);
        step(k, part[0], part[1]);
    }
    for (int j = 2; j < 8; j += 2) {
        part[0] = _mm256_add_epi32(part[0], part[j]);
        part[1] = _mm256_add_epi32(part[1], part[j + 1]);
    }
    return _mm256_add_epi32(part[0], part[1]);
}

// One x row against NR int4 rows (decode): block after block of each row (for_int4_blocks), the
// codes times xq summed in int32 (int4_block_sums; one row: int4_row_sum) and scaled into float32
// once per block; then each row's shift term over the groups, the NR rows' dot products side by
// side. `tile`, general over spans of columns and x rows, ran 32-element groups at about half
// this speed (perf: its per-group loop control, and each row's shift dot product, one
// dependency chain; bench/HISTORY.md, "Figures that were in code comments").
template <int KIND, int NR>
inline void int4_tile_one_x(const Params &p, int64_t n, const Input &in, int64_t k_in, float *out) {
    const int64_t groups = p.groups_per_row;
    const uint8_t *rows[NR];
    const float *scales[NR];
    __m256 acc[NR];  // the int32 sums' 8 lanes, scaled (on AVX-512 too: 512-bit vectors half zeros cost twice)
    for (int r = 0; r < NR; ++r) {
        rows[r] = p.w + (n + r) * p.row_bytes;
        scales[r] = p.scale + (n + r) * groups;
        acc[r] = _mm256_setzero_ps();
    }
    const int64_t ahead = NR * p.row_bytes;  // the next tile's rows, a cache line at a time
    for_int4_blocks<KIND>(p, 0, k_in, [&](int64_t b, int64_t stop, int64_t g) {
        __m256i part[NR][1];
        if constexpr (NR == 1) {
            part[0][0] = int4_row_sum(rows[0], in.xq, b, stop);
        } else {
            for (int r = 0; r < NR; ++r) part[r][0] = _mm256_setzero_si256();
            int4_block_sums<NR, 1, true>(rows, ahead, in.xq, k_in, b, stop, part);
        }
        for (int r = 0; r < NR; ++r)
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(part[r][0]), _mm256_set1_ps(scales[r][g]), acc[r]);
    });
    vec shifted[NR];
    for (int r = 0; r < NR; ++r) shifted[r] = vzero();
    int64_t g = 0;
    for (; g + W <= groups; g += W) {
        const vec xs = vload(in.sums + g);
        for (int r = 0; r < NR; ++r) shifted[r] = vfma(vload(p.shift + (n + r) * groups + g), xs, shifted[r]);
    }
    for (int r = 0; r < NR; ++r) {  // summed in `dot`'s order: a batch's rows come out bit for bit the same
        float shift = vsum(shifted[r]);
        for (int64_t t = g; t < groups; ++t) shift += p.shift[(n + r) * groups + t] * in.sums[t];
        out[r] = vsum8(acc[r]) * in.xscale[0] + shift;
    }
}

// NR int4 rows against MR x rows (batched decode): int4_tile_one_x's blocks with MR x rows.
// The NR x MR float sums stay in memory between blocks (the empty asm below keeps them there):
// the int32 sums and the unpacked codes need every vector register, and the general tile,
// holding both sets in registers, spilled its int32 sums on every 32 codes (perf). On AVX-512,
// rows in pairs (int4_pair_sums), 4 rows by 8 x rows (bench/HISTORY.md, "Paired int4 rows on
// AVX-512"). A row's MR outputs are reduced together (lane_sums) rather than a vsum per output
// (bench/HISTORY.md, "Batched int4 epilogue"). Summing each block's int32 lanes before scaling
// was as fast at 8 x rows but slowed a single x row's grouped int4.
template <int KIND, int NR, int MR>
inline void int4_tile_few_x(const Params &p, int64_t n, const Input &in, int64_t k_in, float *out, int64_t n_out) {
    const int64_t groups = p.groups_per_row;
    const uint8_t *rows[NR];
    for (int r = 0; r < NR; ++r) rows[r] = p.w + (n + r) * p.row_bytes;
    alignas(32) float acc[NR][MR][8];  // as int4_tile_one_x's
    const int64_t ahead = NR * p.row_bytes;
    for_int4_blocks<KIND>(p, 0, k_in, [&](int64_t b, int64_t stop, int64_t g) {
        __m256i part[NR][MR];
        for (int r = 0; r < NR; ++r)
            for (int i = 0; i < MR; ++i) part[r][i] = _mm256_setzero_si256();
#if defined(__AVX512F__)
        if constexpr (NR % 2 == 0) int4_pair_sums<NR / 2, MR>(rows, ahead, in.xq, k_in, b, stop, part);
        else
#endif
            int4_block_sums<NR, MR, true>(rows, ahead, in.xq, k_in, b, stop, part);
        __asm__ volatile("" : : "r"(&acc[0][0][0]) : "memory");
        for (int r = 0; r < NR; ++r) {
            const __m256 s = _mm256_set1_ps(p.scale[(n + r) * groups + g]);
            for (int i = 0; i < MR; ++i) {  // the first block starts the sums (zero plus, as int4_tile_one_x)
                const __m256 before = b == 0 ? _mm256_setzero_ps() : _mm256_load_ps(acc[r][i]);
                _mm256_store_ps(acc[r][i], _mm256_fmadd_ps(_mm256_cvtepi32_ps(part[r][i]), s, before));
            }
        }
    });
    // y = (lane sums) * xscale + shift . xsum, the MR x rows side by side (MR <= 8 lanes), in
    // vectors rather than a scalar end and a dot product per output (bench/HISTORY.md, "Attention
    // in blocks, decode rows in chunks, a vector tile end").
    alignas(32) float xscale[8] = {}, xsum[8] = {};
    std::copy(in.xscale, in.xscale + MR, xscale);
    if (groups == 1)
        for (int i = 0; i < MR; ++i) xsum[i] = in.sums[i];
    for (int r = 0; r < NR; ++r) {
        __m256 row_accs[MR];
        for (int i = 0; i < MR; ++i) row_accs[i] = _mm256_load_ps(acc[r][i]);
        alignas(32) float shift[8] = {}, y[8];
        if (groups == 1) {  // per-row int4: the shift term is one product, added to zero as in dot
            const __m256 product = _mm256_mul_ps(_mm256_set1_ps(p.shift[n + r]), _mm256_load_ps(xsum));
            _mm256_store_ps(shift, _mm256_add_ps(_mm256_setzero_ps(), product));
        } else {
            for (int i = 0; i < MR; ++i) shift[i] = dot(p.shift + (n + r) * groups, in.sums + i * groups, groups);
        }
        _mm256_store_ps(y, _mm256_add_ps(_mm256_mul_ps(lane_sums<MR>(row_accs), _mm256_load_ps(xscale)),
                                         _mm256_load_ps(shift)));
        for (int i = 0; i < MR; ++i) out[i * n_out + r] = y[i];
    }
}

// Rows [begin, end) of W against a few x rows (decode, batched decode): a single x row over 16-bit,
// int8 or per-row int4 rows, or float32 rows up to 1024 columns, in order (rows_in_order,
// int4_tile_one_x<1>); else eight weight rows at a time for a single x row (grouped int4: two or
// four, int4_tile_one_x), two for batches (int4: int4_tile_few_x, four on AVX-512), whose x rows
// then share each weight load; each weight tile is read from memory once and from L1 for the
// further x rows.
// Long per-row int4 rows take the four-row tile for a single x row too, for the reason the 16-bit
// rows do (rows_in_order): one row at a time, an x row of 16-bit integers past ~8 KB was re-read
// from L2 for every weight row, four x lines per weight line. Bit for bit the same sums (integer
// lanes, then one scaling per block in both). The AVX2 build gains only past 8192 columns, so
// there the tile starts later (bench/HISTORY.md, "Long rows").
constexpr int64_t INT4_SHARED_X_MIN_COLS = W == 16 ? 4097 : 8193;

template <int KIND>
void rows_for(const Params &p, int64_t begin, int64_t end, int64_t M, const Input &xs, int64_t k_in, float *ys,
              int64_t n_out) {
    int64_t n = begin;
    if constexpr (is_int4<KIND>) {
        if (M == 1) {
            // per-row int4 (one group a row) one row at a time, in order (up to
            // INT4_SHARED_X_MIN_COLS columns; past it in tiles of four): a single stream per
            // thread, which the hardware prefetcher follows best. Grouped rows went the other way
            // (each row's short blocks then pay their own setup and scaling), so they stay in
            // tiles: two rows for groups of 128 and more, four for groups of 32 (bench/HISTORY.md,
            // "Streaming weights on Zen 4").
            if (p.groups_per_row == 1) {
                if (k_in >= INT4_SHARED_X_MIN_COLS)
                    for (; n + 4 <= end; n += 4) int4_tile_one_x<KIND, 4>(p, n, xs, k_in, ys + n);
                for (; n < end; ++n) int4_tile_one_x<KIND, 1>(p, n, xs, k_in, ys + n);
                return;
            }
            constexpr int ONE_X_NR = KIND == INT4_G32 ? 4 : 2;
            for (; n + ONE_X_NR <= end; n += ONE_X_NR) int4_tile_one_x<KIND, ONE_X_NR>(p, n, xs, k_in, ys + n);
            for (; n < end; ++n) int4_tile_one_x<KIND, 1>(p, n, xs, k_in, ys + n);
            return;
        }
        // each tile of weight rows meets every tile of x rows while it is in L1: MB x rows at a
        // time, or on AVX-512 (int4_pair_sums: 4 weight rows by 8 x rows fill its registers) 8
        auto pass = [&](auto nr, int64_t r) {
            constexpr int XR = W == 16 ? 8 : MB;
            for (int64_t m0 = 0; m0 < M; m0 += XR) {
                const Input xm = xs.from(m0, k_in);
                float *out = ys + m0 * n_out + r;
                with_row_count<XR>(std::min<int64_t>(XR, M - m0), [&](auto mr) {
                    int4_tile_few_x<KIND, decltype(nr)::value, decltype(mr)::value>(p, r, xm, k_in, out, n_out);
                });
            }
        };
        if constexpr (W == 16)
            for (; n + 4 <= end; n += 4) pass(std::integral_constant<int, 4>{}, n);
        for (; n + 2 <= end; n += 2) pass(std::integral_constant<int, 2>{}, n);
        for (; n < end; ++n) pass(std::integral_constant<int, 1>{}, n);
    } else {
        if (reads_in_order(KIND, M, k_in)) {
            rows_in_order<KIND>(p, begin, end, xs, k_in, ys);
            return;
        }
        const Span all{0, k_in, false, true};
        auto all_rows = [&](auto nr, int64_t r) {
            for (int64_t m0 = 0; m0 < M; m0 += MB) tile_rows<KIND, decltype(nr)::value, true>(p, r, m0, M, xs, k_in, all, ys, n_out);
        };
        if (M == 1) {  // eight accumulators
            for (; n + 8 <= end; n += 8) all_rows(std::integral_constant<int, 8>{}, n);
            for (; n + 4 <= end; n += 4) all_rows(std::integral_constant<int, 4>{}, n);
        }
        for (; n + 2 <= end; n += 2) all_rows(std::integral_constant<int, 2>{}, n);
        for (; n < end; ++n) all_rows(std::integral_constant<int, 1>{}, n);
    }
}

// Weight rows [n0, n1) against every MB-row tile of x over the columns `ks`: NR rows per tile,
// one at a time for the rest. The block is read from L2, each x tile from L1.
template <int KIND, int NR>
void block_tiles(const Params &p, int64_t n0, int64_t n1, int64_t M, const Input &xs, int64_t k_in, const Span &ks,
                 float *ys, int64_t n_out) {
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int64_t n = n0;
        for (; n + NR <= n1; n += NR) tile_rows<KIND, NR, false>(p, n, m0, M, xs, k_in, ks, ys, n_out);
        for (; n < n1; ++n) tile_rows<KIND, 1, false>(p, n, m0, M, xs, k_in, ks, ys, n_out);
    }
}

// Rows [n0, n1) of W, columns [k0, k0 + kc), widened to float32 into out [n1 - n0, kc].
void widen(const Params &p, int64_t n0, int64_t n1, int64_t k0, int64_t kc, float *out) {
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = 0; k < kc; k += W) vstore(out + (n - n0) * kc + k, load_w(p, n, k0 + k));
}

// Rows [begin, end) of W against many x rows (a prompt), blocked so that both stay in cache:
// a block of NC weight rows times KC columns (tens of KB, in L2) meets every MB-row tile of x
// (KC columns of it, in L1) before the next block is read. Walking all of x per pair of weight
// rows, as rows_for does, streamed a 128-token prompt (1 MB of x) from L3 for every pair.
template <int KIND>
void rows_blocked(const Params &p, int64_t begin, int64_t end, int64_t M, const Input &xs, int64_t k_in, float *ys,
                  int64_t n_out) {
    constexpr int NR = is_int4<KIND> ? 2 : 3;  // 3 x MB float accumulators; int4 also holds int32 partials
    for (int64_t n0 = begin; n0 < end; n0 += NC) {
        const int64_t n1 = std::min(n0 + NC, end);
        for (int64_t k0 = 0; k0 < k_in; k0 += KC) {
            const Span ks{k0, std::min(k0 + KC, k_in), k0 > 0, k0 + KC >= k_in};
            block_tiles<KIND, NR>(p, n0, n1, M, xs, k_in, ks, ys, n_out);
        }
    }
}

// int4 rows [begin, end) against many x rows: each block of NC rows x KCW columns widened once
// to float32 (fastllm's formula, as dequantize_rows) into a per-thread buffer, which the float32
// tiles then read like any float weight; x is float32, already rounded to its 16-bit grid.
void rows_widened(const Params &p, int64_t begin, int64_t end, int64_t M, const float *x, int64_t k_in, float *ys,
                  int64_t n_out) {
    thread_local std::vector<float> block;
    block.resize(NC * KCW);
    for (int64_t n0 = begin; n0 < end; n0 += NC) {
        const int64_t n1 = std::min(n0 + NC, end);
        for (int64_t k0 = 0; k0 < k_in; k0 += KCW) {
            const int64_t kc = std::min(KCW, k_in - k0);
            widen(p, n0, n1, k0, kc, block.data());
            // the block as float32 rows 0..n1 - n0 of kc columns; x from column k0; outputs from column n0
            const Params wide{FP32, (const uint8_t *)block.data(), kc * 4, nullptr, nullptr, kc, 1, n1 - n0};
            const Input xk{x + k0, nullptr, nullptr, nullptr, 0};
            block_tiles<FP32, 3>(wide, 0, n1 - n0, M, xk, k_in, Span{0, kc, k0 > 0, true}, ys + n0, n_out);
        }
    }
}

template <int KIND>
void rows_any(const Params &p, int64_t begin, int64_t end, int64_t M, const Input &xs, int64_t k_in, float *ys,
              int64_t n_out, bool blocked) {
    if (blocked) rows_blocked<KIND>(p, begin, end, M, xs, k_in, ys, n_out);
    else rows_for<KIND>(p, begin, end, M, xs, k_in, ys, n_out);
}

// The step of a row's 16-bit grid: max|x| / 32767 (1 for a row of zeros).
float int16_step(const float *row, int64_t k_in) {
    vec top = vzero();
    for (int64_t k = 0; k < k_in; k += W) top = vmax_abs(top, vload(row + k));
    const float most = vmax(top);
    return most > 0.f ? most / 32767.f : 1.f;
}

// round(x / s) for the W elements of x from p, as float32 (exact integers): vector division and
// rounding to nearest even, the same numbers as quant.round_input_int16's (scalar rounding took
// a noticeable share of a batched decode step: bench/HISTORY.md, "Batched int4 epilogue").
inline vec grid_steps(const float *p, vec s) { return vround(vdiv(vload(p), s)); }

// int4's input: each row rounded to 16 bits, xq = round(x / s) with s = max|x| / 32767 (the
// grid of quant.round_input_int16), each 32-element block reordered evens-then-odds, the order
// the int4 tiles read; sums[i, g] = s * sum of group g's xq (the rounded x's sum, exactly).
// Rows in parallel (K is a multiple of 32).
void round_int4_input(const float *x, int64_t M, int64_t k_in, int64_t group, int16_t *xq, float *xscale,
                      float *sums) {
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const float *row = x + i * k_in;
            const float s = int16_step(row, k_in);
            const vec sv = vset(s);
            xscale[i] = s;
            for (int64_t g = 0; g < k_in / group; ++g) {
                int64_t total = 0;
                for (int64_t b = g * group; b < (g + 1) * group; b += 32) {
                    alignas(64) float q[32];
                    for (int j = 0; j < 32; j += W) vstore(q + j, grid_steps(row + b + j, sv));
                    total += evens_then_odds_i16(q, xq + i * k_in + b);
                }
                sums[i * (k_in / group) + g] = s * (float)total;
            }
        }
    });
}

// The same grid as float32 in element order, s * round(x / s): what rows_widened multiplies.
void round_input_float(const float *x, int64_t M, int64_t k_in, float *xr) {
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const float *row = x + i * k_in;
            const vec s = vset(int16_step(row, k_in));
            for (int64_t k = 0; k < k_in; k += W) vstore(xr + i * k_in + k, vmul(grid_steps(row + k, s), s));
        }
    });
}

}  // namespace

Params make_params(Kind kind, const torch::Tensor &w, const torch::Tensor &scale, const torch::Tensor &shift,
                   int64_t group, int64_t groups_per_row, int64_t k_in) {
    TORCH_CHECK(w.is_contiguous() && w.dim() == 2, "weights must be a contiguous 2-D tensor");
    const int64_t row_bytes = w.size(1) * (int64_t)w.element_size();
    const int64_t expected = kind == INT8 ? k_in : kind == INT4 ? k_in / 2 : kind == FP32 ? 4 * k_in : 2 * k_in;
    TORCH_CHECK(row_bytes == expected, "weight rows hold ", row_bytes, " bytes; K = ", k_in, " needs ", expected);
    TORCH_CHECK(kind != INT4 || group % 32 == 0, "int4 groups must be a multiple of 32");
    TORCH_CHECK(kind != FP32 || w.scalar_type() == torch::kFloat, "FP32 weights must be float32 tensors");
    Params p{kind, (const uint8_t *)w.data_ptr(), row_bytes, nullptr, nullptr, group, groups_per_row, w.size(0)};
    if (kind == INT8 || kind == INT4) {
        TORCH_CHECK(scale.scalar_type() == torch::kFloat && shift.scalar_type() == torch::kFloat, "float32 params");
        p.scale = scale.data_ptr<float>();
        p.shift = shift.data_ptr<float>();
    }
    return p;
}

void linear_raw(const std::vector<Params> &ps, int64_t M, const float *x, int64_t k_in, float *ys, bool steps) {
    TORCH_CHECK(k_in % 32 == 0, "K must be a multiple of 32");
    const Kind kind = ps[0].kind;
    int64_t n_total = 0;
    for (const Params &p : ps) n_total += p.n;
    // int4 on at least as many x rows as a group has elements: the integer tiles would rescale
    // each group's sums more often (once per x row) than widening touches each weight (once); at
    // 16 rows the integer tiles win (bench/HISTORY.md, "Figures that were in code comments").
    // A prompt past the decode tiles' rows: cache-sized blocks (16 served sequences through the
    // blocks gave other greedy tokens than each alone: the blocks sum long rows in other spans)
    const bool blocked = M > BLOCKED_ABOVE && !steps;
    const bool widen = kind == INT4 && blocked && M >= ps[0].group;
    // int4 tiles read x rounded to 16 bits and deinterleaved (widened blocks: rounded, in order;
    // one x row against split-loaded bf16 or int8 rows: reordered, xf); quantized kinds need
    // sum(x) per group (int8: per row) for the shift term. Scratch reused across calls: the
    // decode step calls this per layer.
    thread_local std::vector<float> sums, xscale, xf;
    thread_local std::vector<int16_t> xq;
    const int64_t group = kind == INT4 ? ps[0].group : k_in, sum_stride = k_in / group;
    sums.resize(M * sum_stride);
    Input xs{x, nullptr, nullptr, sums.data(), sum_stride};
    if (widen) {
        xf.resize(M * k_in);
        round_input_float(x, M, k_in, xf.data());
        xs.x = xf.data();
    } else if (kind == INT4) {
        xq.resize(M * k_in);
        xscale.resize(M);
        round_int4_input(x, M, k_in, group, xq.data(), xscale.data(), sums.data());
        xs = {nullptr, xq.data(), xscale.data(), sums.data(), sum_stride};
    } else if (kind == INT8) {
        for (int64_t i = 0; i < M; ++i) {
            vec acc = vzero();
            for (int64_t k = 0; k < k_in; k += W) acc = vadd(acc, vload(x + i * k_in + k));
            sums[i] = vsum(acc);
        }
    }
    if (const int split = split_loads(kind); split > 1 && reads_in_order(kind, M, k_in)) {
        // x in the order of rows_in_order's split loads: each load's split * W elements as the
        // vectors it fills (vector s: elements j * split + s); the tail in element order
        xf.assign(x, x + k_in);
        for (int64_t b = 0; b < k_in / IN_ORDER_STEP * IN_ORDER_STEP; b += split * W)
            for (int s = 0; s < split; ++s)
                for (int j = 0; j < W; ++j) xf[b + s * W + j] = x[b + j * split + s];
        xs.x = xf.data();
    }
    // decode: rows in chunks of at least 16 (whole tiles), about four per thread, at most 256
    const int64_t threads = at::get_num_threads();
    const int64_t chunk = blocked ? 0 : std::clamp<int64_t>((n_total / (4 * threads) + 15) / 16 * 16, 16, 256);
    parallel_parts(ps, ys, chunk, [&](size_t j, int64_t lo, int64_t hi, float *yj) {
        if (widen) {
            rows_widened(ps[j], lo, hi, M, xs.x, k_in, yj, n_total);
            return;
        }
        switch (kind) {
        case BF16: rows_any<BF16>(ps[j], lo, hi, M, xs, k_in, yj, n_total, blocked); break;
        case FP16: rows_any<FP16>(ps[j], lo, hi, M, xs, k_in, yj, n_total, blocked); break;
        case INT8: rows_any<INT8>(ps[j], lo, hi, M, xs, k_in, yj, n_total, blocked); break;
        case INT4:
            if (ps[j].group == 32) rows_any<INT4_G32>(ps[j], lo, hi, M, xs, k_in, yj, n_total, blocked);
            else rows_any<INT4>(ps[j], lo, hi, M, xs, k_in, yj, n_total, blocked);
            break;
        case FP32: rows_any<FP32>(ps[j], lo, hi, M, xs, k_in, yj, n_total, blocked);
        }
    });
}

// x: [M, K] float32 contiguous times several weights of one kind, group layout and K (e.g. q,
// k and v): returns [M, sum of their N] float32, the outputs side by side. One call and one
// parallel region instead of one per weight.
torch::Tensor linear(torch::Tensor x, Kind kind, std::vector<torch::Tensor> ws, std::vector<torch::Tensor> scales,
                     std::vector<torch::Tensor> shifts, int64_t group, int64_t groups_per_row,
                     std::vector<int64_t> n_outs, int64_t k_in, bool in_bf16, bool steps) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == k_in,
                "x must be contiguous float32 [M, K]");
    const size_t parts = ws.size();
    TORCH_CHECK(parts > 0 && scales.size() == parts && shifts.size() == parts && n_outs.size() == parts,
                "one scale, shift and output size per weight");
    std::vector<Params> ps;
    int64_t n_total = 0;
    for (size_t j = 0; j < parts; ++j) {
        TORCH_CHECK(ws[j].size(0) == n_outs[j], "weight rows must match the output size");
        ps.push_back(make_params(kind, ws[j], scales[j], shifts[j], group, groups_per_row, k_in));
        n_total += n_outs[j];
    }
    auto y = torch::empty({x.size(0), n_total}, x.options());
    if (in_bf16) linear_bf16(ps, x.size(0), x.data_ptr<float>(), k_in, y.data_ptr<float>());
    else linear_raw(ps, x.size(0), x.data_ptr<float>(), k_in, y.data_ptr<float>(), steps);
    return y;
}

// Rows [row0, row1) of W widened to float32, into the caller's `out` (a reused prefill buffer).
void dequantize_rows(Kind kind, torch::Tensor w, torch::Tensor scale, torch::Tensor shift, int64_t group,
                     int64_t groups_per_row, int64_t row0, int64_t row1, int64_t k_in, torch::Tensor out) {
    Params p = make_params(kind, w, scale, shift, group, groups_per_row, k_in);
    TORCH_CHECK(row0 >= 0 && row0 <= row1 && row1 <= p.n, "rows out of range");
    TORCH_CHECK(out.scalar_type() == torch::kFloat && out.is_contiguous() && out.numel() == (row1 - row0) * k_in,
                "out must be a contiguous float32 [rows, K] tensor");
    float *os = out.data_ptr<float>();
    at::parallel_for(row0, row1, 16,
                     [&](int64_t begin, int64_t end) { widen(p, begin, end, 0, k_in, os + (begin - row0) * k_in); });
}

}  // namespace flm
