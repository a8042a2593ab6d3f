// One decode step in one call: for B sequences, one new token each, from the token ids to the
// logits: embedding row -> per layer RMSNorm -> fused q/k/v -> RoPE -> KV-cache write ->
// attention -> o -> residual -> RMSNorm -> fused gate/up -> SiLU * up -> down -> residual ->
// final norm -> output layer, on plain float buffers. Driving the same work from Python costs
// about twenty ATen ops per layer, as long as reading a small model's weights; here only the
// linear kernels and the attention open parallel regions.
// The formulas are transformers' LlamaDecoderLayer in float32 (tests compare the two).
#include "flm_kernels.h"
#include "kv_rows.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>

namespace flm {

// A linear layer (or several side by side) as the kernels see it, with its bias; holds the
// tensors so that the pointers in `parts` stay valid.
struct LinearWeights {
    std::vector<Params> parts;
    std::vector<torch::Tensor> keep;
    torch::Tensor bias;  // [n] or empty
    int64_t n = 0, k = 0;

    void apply(int64_t M, const float *x, float *y) const {
        linear_raw(parts, M, x, k, y, true);  // one token per sequence
        if (bias.numel() == 0) return;
        const float *b = bias.data_ptr<float>();
        for (int64_t i = 0; i < M; ++i) axpy(1.f, b, y + i * n, n);
    }
};

LinearWeights make_linear_weights(Kind kind, std::vector<torch::Tensor> ws, std::vector<torch::Tensor> scales,
                                  std::vector<torch::Tensor> shifts, int64_t group, int64_t groups_per_row,
                                  int64_t k_in, torch::Tensor bias) {
    LinearWeights lw;
    lw.k = k_in;
    for (size_t j = 0; j < ws.size(); ++j) {
        lw.parts.push_back(make_params(kind, ws[j], scales[j], shifts[j], group, groups_per_row, k_in));
        lw.n += ws[j].size(0);
        lw.keep.insert(lw.keep.end(), {ws[j], scales[j], shifts[j]});
    }
    TORCH_CHECK(bias.numel() == 0 || (bias.numel() == lw.n && bias.scalar_type() == torch::kFloat &&
                                      bias.is_contiguous()),
                "bias must be float32 [N]");
    lw.bias = bias;
    return lw;
}

struct DecoderLayer {
    torch::Tensor input_norm, post_norm;
    LinearWeights qkv, o, gate_up, down;
};

// out = x * w / sqrt(mean(x^2) + eps), one row of n
inline void rms_norm(const float *x, const float *w, float eps, int64_t n, float *out) {
    const float inv = 1.f / std::sqrt(dot(x, x, n) / n + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

// rotate-half RoPE on one head in place: x * cos + rotate_half(x) * sin
inline void rope(float *x, const float *cos, const float *sin, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

// Attention works on a run of query heads that share a KV head, a block of cache rows at a time
// for all of them while the block is in L1 (one head at a time read every row from L2 again for
// each head of its group), its dot products without a horizontal sum per key (key_dots) and its
// exps in vectors (vexp): bench/HISTORY.md, "Attention in blocks".
constexpr int64_t KEY_BLOCK = 32;  // cache rows: 32 x 128 float32 (16 KB) at most for head_dim 128

// out[g * n + j] = q_g . k_j for `heads` query rows q_g (dim apart) and n key rows k_j (dim
// apart, stored as KV; INT8 rows times their scales kscale[j]): 8 keys at a time per head, each
// key's products in the 8 lanes of its own accumulator, lane_sums adding the 8 keys' lanes.
template <int KV>
inline void key_dots(const float *q, int64_t heads, const uint8_t *k, const float *kscale, int64_t dim, int64_t n,
                     float *out) {
    const int64_t body = dim / 8 * 8, row = dim * kv_bytes(KV);
    for (int64_t j0 = 0; j0 < n; j0 += KEY_BLOCK)
        for (int64_t g = 0; g < heads; ++g)
            for (int64_t j = j0; j < std::min(n, j0 + KEY_BLOCK); j += 8)
                with_row_count<8>(std::min<int64_t>(8, n - j), [&](auto keys) {
                    constexpr int C = decltype(keys)::value;
                    const float *qg = q + g * dim;
                    const uint8_t *kj = k + j * row;
                    __m256 acc[C];
                    for (auto &a : acc) a = _mm256_setzero_ps();
                    for (int64_t d = 0; d < body; d += 8) {
                        const __m256 qv = _mm256_loadu_ps(qg + d);
                        for (int i = 0; i < C; ++i) acc[i] = _mm256_fmadd_ps(qv, load8_kv<KV>(kj + i * row, d), acc[i]);
                    }
                    alignas(32) float sums[8];
                    _mm256_store_ps(sums, lane_sums<C>(acc));
                    for (int i = 0; i < C; ++i) {
                        for (int64_t d = body; d < dim; ++d) sums[i] += qg[d] * kv_at<KV>(kj + i * row, d);
                        out[g * n + j + i] = KV == INT8 ? sums[i] * kscale[j + i] : sums[i];
                    }
                });
}

// out_g[0, dim) = sum_j p[g * n + j] v_j for `heads` outputs (dim apart) over n value rows (dim
// apart, stored as KV; INT8 rows' scales vscale[j] folded into p): per block of rows, each
// head's sums for four vectors of columns in registers, added in the order of one multiply-add
// per row (as an axpy per row would).
template <int KV>
inline void weighted_sums(const float *p, int64_t heads, const uint8_t *v, const float *vscale, int64_t n,
                          int64_t dim, float *out) {
    const int64_t body = dim / W * W, row = dim * kv_bytes(KV);
    auto weight = [&](int64_t g, int64_t j) { return KV == INT8 ? p[g * n + j] * vscale[j] : p[g * n + j]; };
    for (int64_t j0 = 0; j0 < n; j0 += KEY_BLOCK) {
        const int64_t j1 = std::min(n, j0 + KEY_BLOCK);
        for (int64_t g = 0; g < heads; ++g)
            for (int64_t d0 = 0; d0 < body; d0 += 4 * W)
                with_row_count<4>(std::min<int64_t>(4, (body - d0) / W), [&](auto vectors) {
                    constexpr int C = decltype(vectors)::value;
                    float *o = out + g * dim + d0;
                    vec acc[C];
                    for (int c = 0; c < C; ++c) acc[c] = j0 == 0 ? vzero() : vload(o + c * W);
                    for (int64_t j = j0; j < j1; ++j) {
                        const vec pj = vset(weight(g, j));
                        for (int c = 0; c < C; ++c) acc[c] = vfma(pj, load_kv<KV>(v + j * row, d0 + c * W), acc[c]);
                    }
                    for (int c = 0; c < C; ++c) vstore(o + c * W, acc[c]);
                });
    }
    for (int64_t g = 0; g < heads; ++g)
        for (int64_t d = body; d < dim; ++d) {
            float sum = 0.f;
            for (int64_t j = 0; j < n; ++j) sum += weight(g, j) * kv_at<KV>(v + j * row, d);
            out[g * dim + d] = sum;
        }
}

// body(i, in, out) for i = 0, W, 2W, ... < n: in(p) loads W floats from p, out(p, v) stores v's
// lanes to p; the last, partial vector through a copy padded with `fill`, so that every element
// goes through the same vector arithmetic.
template <typename Body>
inline void for_vectors(int64_t n, float fill, Body &&body) {
    int64_t i = 0;
    for (; i + W <= n; i += W) body(i, vload, vstore);
    if (i == n) return;
    const int64_t rest = n - i;
    auto in = [&](const float *p) {
        alignas(64) float pad[W];
        std::fill(pad + rest, pad + W, fill);
        std::memcpy(pad, p, rest * 4);
        return vload(pad);
    };
    auto out = [&](float *p, vec v) {
        alignas(64) float pad[W];
        vstore(pad, v);
        std::memcpy(p, pad, rest * 4);
    };
    body(i, in, out);
}

// s[0, n) <- softmax(s * scale) in place (scale > 0); the padding of a partial vector is -inf,
// which neither raises the maximum nor adds to the sum (vexp gives 0).
inline void softmax(float *s, int64_t n, float scale) {
    constexpr float NONE = -INFINITY;
    vec top = vset(NONE);
    for_vectors(n, NONE, [&](int64_t j, const auto &in, const auto &out) {
        const vec v = vmul(in(s + j), vset(scale));
        out(s + j, v);
        top = vmax_lanes(top, v);
    });
    const vec shift = vset(-vmax(top));
    vec total = vzero();
    for_vectors(n, NONE, [&](int64_t j, const auto &in, const auto &out) {
        const vec e = vexp(vadd(in(s + j), shift));
        out(s + j, e);
        total = vadd(total, e);
    });
    const vec sum = vset(vsum(total));
    for_vectors(n, NONE, [&](int64_t j, const auto &in, const auto &out) { out(s + j, vdiv(in(s + j), sum)); });
}

// f(std::integral_constant<int, kind>) for a KV cache's storage kind.
template <typename F>
inline void with_kv_kind(Kind kind, F &&f) {
    switch (kind) {
    case FP16: return f(std::integral_constant<int, FP16>{});
    case BF16: return f(std::integral_constant<int, BF16>{});
    case INT8: return f(std::integral_constant<int, INT8>{});
    default: return f(std::integral_constant<int, FP32>{});
    }
}

// The KV caches of a step's sequences: per sequence and layer (sequence-major) the keys and
// values [kv_heads, capacity, head_dim], and for INT8 their rows' scales [kv_heads, capacity].
struct Caches {
    const std::vector<torch::Tensor> &keys, &values, &key_scales, &value_scales;

    // The storage kind, after checking every tensor against the model's shapes and the positions.
    Kind check(int64_t count, int64_t kv_heads, int64_t dim, const std::vector<int64_t> &positions, int64_t L) const {
        TORCH_CHECK((int64_t)keys.size() == count && (int64_t)values.size() == count, "one cache per layer per sequence");
        const auto type = keys[0].scalar_type();
        const Kind kind = type == torch::kFloat ? FP32 : type == torch::kHalf ? FP16 : type == torch::kBFloat16 ? BF16
                          : type == torch::kChar ? INT8 : FP32;
        TORCH_CHECK(kind != FP32 || type == torch::kFloat, "KV caches must be float32, float16, bfloat16 or int8");
        const bool scaled = kind == INT8;
        TORCH_CHECK((int64_t)key_scales.size() == (scaled ? count : 0) && key_scales.size() == value_scales.size(),
                    "int8 caches come with one scale tensor per layer per sequence, others with none");
        for (int64_t c = 0; c < count; ++c) {
            const int64_t pos = positions[c / L];
            for (const auto *t : {&keys[c], &values[c]})
                TORCH_CHECK(t->dim() == 3 && t->size(0) == kv_heads && t->size(2) == dim && t->size(1) > pos && pos >= 0 &&
                                t->scalar_type() == type && t->is_contiguous(),
                            "cache tensors must be [kv_heads, capacity > position, head_dim] of one dtype");
            if (scaled)
                for (const auto *t : {&key_scales[c], &value_scales[c]})
                    TORCH_CHECK(t->dim() == 2 && t->size(0) == kv_heads && t->size(1) == keys[c].size(1) &&
                                    t->scalar_type() == torch::kFloat && t->is_contiguous(),
                                "int8 cache scales must be float32 [kv_heads, capacity]");
        }
        return kind;
    }

    // Cache c's row at slot (kv_head * capacity + position), as bytes.
    uint8_t *row(const std::vector<torch::Tensor> &rows, int64_t c, int64_t slot, int kind, int64_t dim) const {
        return (uint8_t *)rows[c].data_ptr() + slot * dim * kv_bytes(kind);
    }
    // Its scale (INT8 caches; nullptr otherwise).
    float *scale(const std::vector<torch::Tensor> &scales, int64_t c, int64_t slot) const {
        return scales.empty() ? nullptr : scales[c].data_ptr<float>() + slot;
    }
};

class Decoder {
  public:
    Decoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps)
        : hidden_(hidden), heads_(heads), kv_heads_(kv_heads), dim_(head_dim), inter_(intermediate), eps_(eps) {
        TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of key/value heads");
    }

    void add_layer(torch::Tensor input_norm, torch::Tensor post_norm, LinearWeights qkv, LinearWeights o,
                   LinearWeights gate_up, LinearWeights down) {
        const int64_t q = heads_ * dim_, kv = kv_heads_ * dim_;
        TORCH_CHECK(qkv.n == q + 2 * kv && qkv.k == hidden_ && o.n == hidden_ && o.k == q &&
                        gate_up.n == 2 * inter_ && gate_up.k == hidden_ && down.n == hidden_ && down.k == inter_,
                    "layer weights do not match the model's sizes");
        for (auto *norm : {&input_norm, &post_norm})
            TORCH_CHECK(norm->numel() == hidden_ && norm->scalar_type() == torch::kFloat && norm->is_contiguous(),
                        "norm weights must be float32 [hidden]");
        layers_.push_back({input_norm, post_norm, qkv, o, gate_up, down});
    }

    // The model's final RMSNorm and output layer.
    void set_head(torch::Tensor norm, LinearWeights head) {
        TORCH_CHECK(norm.numel() == hidden_ && norm.scalar_type() == torch::kFloat && norm.is_contiguous(),
                    "norm weights must be float32 [hidden]");
        TORCH_CHECK(head.k == hidden_, "the output layer must take hidden-sized rows");
        head_norm_ = norm;
        head_ = std::move(head);
    }

    // The token embedding table, for token_logits: rows [vocab, hidden * element size] as
    // stored, `kind` BF16, FP16 or FP32.
    void set_embedding(torch::Tensor rows, Kind kind) {
        const int64_t size = kind == FP32 ? 4 : 2;
        TORCH_CHECK(kind == BF16 || kind == FP16 || kind == FP32, "embedding rows must be bf16, fp16 or float32");
        TORCH_CHECK(hidden_ % W == 0, "the hidden size must be a multiple of ", W, " (whole vectors)");
        TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous() && rows.size(1) * rows.element_size() == hidden_ * size,
                    "embedding rows must be contiguous [vocab, hidden] of their kind");
        embed_ = rows;
        embed_kind_ = kind;
    }

    // One token per sequence from its id to logits [B, vocab]: the embedding row, cos/sin rows
    // rotary_rows[b] of the rotary tables [rows, head_dim], every layer, the final norm and output
    // layer, all in this call: each torch op between two steps ran with caches the step had just
    // flushed, several times slower than warm (bench/HISTORY.md, "Decode step in C++").
    // keys/values: B * layers tensors (sequence-major), each [kv_heads, capacity, head_dim] of one
    // dtype (float32, float16, bfloat16, or int8 with key_scales/value_scales [kv_heads,
    // capacity] float32 beside; empty lists otherwise); token b is written at positions[b] and attends to keys
    // max(0, positions[b] - window + 1) ..= positions[b] (window 0: all). rotary_rows is
    // positions where one table holds every position's angles; rows of per-sequence angles
    // otherwise (dynamic NTK past the trained length: each sequence's depend on its length).
    torch::Tensor token_logits(const std::vector<int64_t> &tokens, const std::vector<torch::Tensor> &keys,
                               const std::vector<torch::Tensor> &values, const std::vector<torch::Tensor> &key_scales,
                               const std::vector<torch::Tensor> &value_scales, const std::vector<int64_t> &positions,
                               const std::vector<int64_t> &rotary_rows, torch::Tensor cos_table,
                               torch::Tensor sin_table, int64_t window) {
        TORCH_CHECK(embed_.defined() && head_.n > 0, "the embedding table and the output layer must be set");
        const int64_t B = tokens.size();
        TORCH_CHECK((int64_t)positions.size() == B && (int64_t)rotary_rows.size() == B,
                    "one position and one rotary row per token");
        for (const auto *t : {&cos_table, &sin_table})
            TORCH_CHECK(t->dim() == 2 && t->size(1) == dim_ && t->scalar_type() == torch::kFloat && t->is_contiguous(),
                        "rotary tables must be float32 [rows, head_dim]");
        std::lock_guard<std::mutex> hold(busy_);  // the scratch is shared; the GIL is released
        x_.resize(B * hidden_);
        cos_.resize(B * dim_);
        sin_.resize(B * dim_);
        for (int64_t b = 0; b < B; ++b) {
            TORCH_CHECK(tokens[b] >= 0 && tokens[b] < embed_.size(0), "token id ", tokens[b], " outside the vocabulary");
            TORCH_CHECK(rotary_rows[b] >= 0 && rotary_rows[b] < cos_table.size(0), "row beyond the rotary tables");
            embedding_row(tokens[b], x_.data() + b * hidden_);
            std::memcpy(cos_.data() + b * dim_, cos_table.data_ptr<float>() + rotary_rows[b] * dim_, dim_ * 4);
            std::memcpy(sin_.data() + b * dim_, sin_table.data_ptr<float>() + rotary_rows[b] * dim_, dim_ * 4);
        }
        run_layers(B, {keys, values, key_scales, value_scales}, positions, window);
        for (int64_t b = 0; b < B; ++b)
            rms_norm(x_.data() + b * hidden_, head_norm_.data_ptr<float>(), eps_, hidden_, normed_.data() + b * hidden_);
        auto logits = torch::empty({B, head_.n}, torch::kFloat);
        head_.apply(B, normed_.data(), logits.data_ptr<float>());
        return logits;
    }

  private:
    void embedding_row(int64_t token, float *out) const {
        const uint8_t *row = (const uint8_t *)embed_.data_ptr() + token * embed_.size(1) * embed_.element_size();
        for (int64_t i = 0; i < hidden_; i += W) vstore(out + i, load_stored(embed_kind_, row, i));
    }

    // Every layer on x_ [B, hidden] with the rotary rows cos_/sin_ [B, head_dim].
    void run_layers(int64_t B, const Caches &caches, const std::vector<int64_t> &positions, int64_t window) {
        const int64_t L = layers_.size();
        const Kind kv = caches.check(B * L, kv_heads_, dim_, positions, L);
        const int64_t q_size = heads_ * dim_, kv_size = kv_heads_ * dim_, qkv_n = q_size + 2 * kv_size;
        normed_.resize(B * std::max(hidden_, inter_));
        qkv_.resize(B * qkv_n);
        attn_.resize(B * q_size);
        gate_up_.resize(B * 2 * inter_);
        delta_.resize(B * hidden_);
        float *xs = x_.data();
        const float *cs = cos_.data(), *sn = sin_.data();
        for (int64_t l = 0; l < L; ++l) {
            const DecoderLayer &layer = layers_[l];
            for (int64_t b = 0; b < B; ++b)
                rms_norm(xs + b * hidden_, layer.input_norm.data_ptr<float>(), eps_, hidden_, normed_.data() + b * hidden_);
            layer.qkv.apply(B, normed_.data(), qkv_.data());
            for (int64_t b = 0; b < B; ++b) {
                float *row = qkv_.data() + b * qkv_n;
                for (int64_t h = 0; h < heads_ + kv_heads_; ++h)  // q heads, then k heads
                    rope(row + h * dim_, cs + b * dim_, sn + b * dim_, dim_);
                for (int64_t h = 0; h < kv_heads_; ++h) {
                    const int64_t c = b * L + l, slot = h * caches.keys[c].size(1) + positions[b];
                    with_kv_kind(kv, [&](auto kind) {
                        constexpr int KV = decltype(kind)::value;
                        store_kv_row<KV>(row + q_size + h * dim_, dim_, caches.row(caches.keys, c, slot, KV, dim_),
                                         caches.scale(caches.key_scales, c, slot));
                        store_kv_row<KV>(row + q_size + kv_size + h * dim_, dim_,
                                         caches.row(caches.values, c, slot, KV, dim_), caches.scale(caches.value_scales, c, slot));
                    });
                }
            }
            with_kv_kind(kv, [&](auto kind) { attention<decltype(kind)::value>(B, L, l, caches, positions, window, qkv_n); });
            layer.o.apply(B, attn_.data(), delta_.data());
            for (int64_t i = 0; i < B * hidden_; ++i) xs[i] += delta_[i];
            for (int64_t b = 0; b < B; ++b)
                rms_norm(xs + b * hidden_, layer.post_norm.data_ptr<float>(), eps_, hidden_, normed_.data() + b * hidden_);
            layer.gate_up.apply(B, normed_.data(), gate_up_.data());
            // SiLU(gate) * up, in parallel: the other core would wait through a batch's scalar exps
            const float *gate_up = gate_up_.data();
            float *act = normed_.data();
            at::parallel_for(0, B * inter_, 2048, [&](int64_t begin, int64_t end) {
                for (int64_t e = begin; e < end;) {  // act element e of row b: gate at e + b * inter_
                    const int64_t b = e / inter_, stop = std::min(end, (b + 1) * inter_);
                    const float *g = gate_up + b * inter_ + e, *u = g + inter_;
                    for_vectors(stop - e, 0.f, [&](int64_t i, const auto &in, const auto &out) {
                        const vec gv = in(g + i);
                        out(act + e + i, vmul(vdiv(gv, vadd(vset(1.f), vexp(vmul(gv, vset(-1.f))))), in(u + i)));
                    });
                    e = stop;
                }
            });
            layer.down.apply(B, normed_.data(), delta_.data());
            for (int64_t i = 0; i < B * hidden_; ++i) xs[i] += delta_[i];
        }
    }

    // softmax(q k^T / sqrt(dim)) v for every (sequence, query head) in one parallel region: each
    // thread takes a run of (sequence, head) pairs, the heads in it that share a KV head together.
    template <int KV>
    void attention(int64_t B, int64_t L, int64_t l, const Caches &caches, const std::vector<int64_t> &positions,
                   int64_t window, int64_t qkv_n) {
        const float scale = 1.f / std::sqrt((float)dim_);
        const int64_t group = heads_ / kv_heads_;
        at::parallel_for(0, B * heads_, 1, [&](int64_t begin, int64_t end) {
            std::vector<float> scores;
            for (int64_t bh = begin; bh < end;) {
                const int64_t b = bh / heads_, h = bh % heads_, kvh = h / group, pos = positions[b];
                const int64_t nh = std::min((kvh + 1) * group - h, end - bh);  // this run's heads of kvh
                const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0, n = pos + 1 - first;
                const int64_t c = b * L + l, slot = kvh * caches.keys[c].size(1) + first;
                scores.resize(nh * n);
                key_dots<KV>(qkv_.data() + b * qkv_n + h * dim_, nh, caches.row(caches.keys, c, slot, KV, dim_),
                             caches.scale(caches.key_scales, c, slot), dim_, n, scores.data());
                for (int64_t g = 0; g < nh; ++g) softmax(scores.data() + g * n, n, scale);
                weighted_sums<KV>(scores.data(), nh, caches.row(caches.values, c, slot, KV, dim_),
                                  caches.scale(caches.value_scales, c, slot), n, dim_,
                                  attn_.data() + b * heads_ * dim_ + h * dim_);
                bh += nh;
            }
        });
    }

    int64_t hidden_, heads_, kv_heads_, dim_, inter_;
    float eps_;
    std::vector<DecoderLayer> layers_;
    torch::Tensor head_norm_, embed_;
    Kind embed_kind_ = FP32;
    LinearWeights head_;  // n = 0 until set_head
    std::vector<float> x_, cos_, sin_, normed_, qkv_, attn_, gate_up_, delta_;  // scratch, reused every step
    std::mutex busy_;
};

void bind_decoder(pybind11::module &m) {
    pybind11::class_<LinearWeights>(m, "LinearWeights");
    m.def("linear_weights", &make_linear_weights, "weights of one (fused) linear layer for the decode step");
    pybind11::class_<Decoder>(m, "Decoder")
        .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double>())
        .def("add_layer", &Decoder::add_layer)
        .def("set_head", &Decoder::set_head)
        .def("set_embedding", &Decoder::set_embedding)
        .def("token_logits", &Decoder::token_logits, "token ids to logits: embedding, layers, norm, output layer",
             pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace flm
