// Paged decode attention on the CPU: the rows of sequences with exactly one query, float32 pages.
//
// Registered with XLA through jax.ffi, built into the same library as cpu_qmatmul.cc (see
// pallas_kernels/cpu_quantized_matmul.py); called by pallas_kernels/ragged_paged_attention_xla.py, whose
// XLA code is the fallback and whose reference is ragged_paged_attention_reference. Why: XLA:CPU ran the
// batched decode pass as a loop of small ops (~30 us an iteration, whatever the batch), which was most of a
// batch-1 decode step's attention. Here a (sequence, KV head) work item walks its pages once: scores of the
// group's query heads against each key, softmax, then the weighted sum of the values. Each row is computed
// on its own, in a fixed order, so its result never depends on the rest of the batch.
//
//   q            [T, H, hd]            float32, H = KVH * G
//   k/v pages    [KVH, P, ps, hd]      float32
//   kv_lens      [S], block_tables [S, maxP], cu_q_lens [S + 1], num_seqs [1]   int32
//   out          [T, H, hd]            decode rows filled, every other row zero

#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using ridgeline::ParallelFor;

namespace {

#if defined(__AVX512F__)
using ridgeline::Exp;

// q . k over hd floats: 16-lane partial sums, then one reduction; the same order for every call.
inline float Dot(const float* q, const float* k, int64_t hd) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= hd; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), acc);
  float dot = _mm512_reduce_add_ps(acc);
  for (; d < hd; ++d) dot += q[d] * k[d];
  return dot;
}

// s[j] = exp(s[j] - m) for j < len; returns their sum (16-lane partial sums, then one reduction).
inline float ExpShiftedAndSum(float* s, int64_t len, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    const __m512 e = Exp(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv));
    _mm512_storeu_ps(s + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (j < len) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (len - j)) - 1);
    const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), mv));
    _mm512_mask_storeu_ps(s + j, tail, e);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(tail, e));
  }
  return _mm512_reduce_add_ps(acc);
}
#else
inline float Dot(const float* q, const float* k, int64_t hd) {
  float dot = 0.f;
  for (int64_t d = 0; d < hd; ++d) dot += q[d] * k[d];
  return dot;
}

inline float ExpShiftedAndSum(float* s, int64_t len, float m) {
  float sum = 0.f;
  for (int64_t j = 0; j < len; ++j) sum += (s[j] = std::exp(s[j] - m));
  return sum;
}
#endif

#if defined(__AVX512F__)
// acc[g] = sum_j p[g, j] * v_j for the group's heads, hd = 16 * NV: the sums of a few heads at a time stay
// in registers while the value rows stream by (the same FMAs, in the same order, as the scalar loop).
template <int NV, typename ForEachPage>
void WeightedValues(ForEachPage& for_each_page, const float* scores, int64_t len, int64_t G, float* acc) {
  constexpr int kHeads = NV <= 4 ? 4 : 2;  // kHeads * NV accumulators + NV value vectors in registers
  for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
    const int heads = static_cast<int>(std::min<int64_t>(kHeads, G - g0));
    __m512 sum[kHeads][NV];
    for (int g = 0; g < kHeads; ++g)
      for (int i = 0; i < NV; ++i) sum[g][i] = _mm512_setzero_ps();
    for_each_page([&](int64_t j0, int64_t n, const float* vr) {
      for (int64_t o = 0; o < n; ++o, vr += 16 * NV) {
        __m512 val[NV];
        for (int i = 0; i < NV; ++i) val[i] = _mm512_loadu_ps(vr + 16 * i);
        for (int g = 0; g < kHeads; ++g) {
          if (g >= heads) break;
          const __m512 p = _mm512_set1_ps(scores[(g0 + g) * len + j0 + o]);
          for (int i = 0; i < NV; ++i) sum[g][i] = _mm512_fmadd_ps(p, val[i], sum[g][i]);
        }
      }
    });
    for (int g = 0; g < heads; ++g)
      for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc + (g0 + g) * 16 * NV + 16 * i, sum[g][i]);
  }
}
#endif

struct Attention {
  const float *q, *k, *v;
  const int32_t *kv_lens, *tables, *cu;
  float* out;
  int64_t num_seqs, kv_heads, group, head_dim, pages, page_size, table_width;
  float sm_scale;

  // Sequence s, KV head h: nothing unless s decodes (one query).
  void Item(int64_t s, int64_t h) const {
    if (cu[s + 1] - cu[s] != 1) return;
    const int64_t t = cu[s], hd = head_dim, G = group;
    const int64_t len = std::min<int64_t>(kv_lens[s], table_width * page_size);
    if (len <= 0) return;
    // Per-thread scratch (an item runs on one thread): no allocation per item.
    thread_local std::vector<float> qs, scores, acc, inv_sum;
    qs.resize(G * hd);
    scores.resize(G * len);
    acc.assign(G * hd, 0.f);
    inv_sum.resize(G);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < hd; ++d) qs[g * hd + d] = q[(t * kv_heads * G + h * G + g) * hd + d] * sm_scale;
    const int32_t* table = tables + s * table_width;
    // Keys j0 .. j0 + n - 1 of one page, walked page by page (no division per key).
    auto for_each_page = [&](auto&& fn) {
      for (int64_t j0 = 0, i = 0; j0 < len; j0 += page_size, ++i) {
        const int64_t page = std::clamp<int64_t>(table[i], 0, pages - 1);
        fn(j0, std::min(page_size, len - j0), ((h * pages + page) * page_size) * hd);
      }
    };
    for_each_page([&](int64_t j0, int64_t n, int64_t offset) {
      const float* kr = k + offset;
      for (int64_t o = 0; o < n; ++o, kr += hd)
        for (int64_t g = 0; g < G; ++g) scores[g * len + j0 + o] = Dot(qs.data() + g * hd, kr, hd);
    });
    for (int64_t g = 0; g < G; ++g) {
      float* sg = scores.data() + g * len;
      const float m = *std::max_element(sg, sg + len);
      inv_sum[g] = 1.f / ExpShiftedAndSum(sg, len, m);
    }
#if defined(__AVX512F__)
    auto for_each_value_page = [&](auto&& fn) {
      for_each_page([&](int64_t j0, int64_t n, int64_t offset) { fn(j0, n, v + offset); });
    };
    if (hd == 64) {
      WeightedValues<4>(for_each_value_page, scores.data(), len, G, acc.data());
    } else if (hd == 128) {
      WeightedValues<8>(for_each_value_page, scores.data(), len, G, acc.data());
    } else
#endif
    for_each_page([&](int64_t j0, int64_t n, int64_t offset) {
      const float* vr = v + offset;
      for (int64_t o = 0; o < n; ++o, vr += hd)
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * len + j0 + o];
          float* ag = acc.data() + g * hd;
          for (int64_t d = 0; d < hd; ++d) ag[d] += p * vr[d];
        }
    });
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < hd; ++d) out[(t * kv_heads * G + h * G + g) * hd + d] = acc[g * hd + d] * inv_sum[g];
  }
};

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 3> q, ffi::Buffer<ffi::F32, 4> k_pages,
                               ffi::Buffer<ffi::F32, 4> v_pages, ffi::Buffer<ffi::S32, 1> kv_lens,
                               ffi::Buffer<ffi::S32, 2> block_tables, ffi::Buffer<ffi::S32, 1> cu_q_lens,
                               ffi::Buffer<ffi::S32, 1> num_seqs, ffi::ResultBuffer<ffi::F32, 3> out, float sm_scale) {
  const int64_t T = q.dimensions()[0], H = q.dimensions()[1], hd = q.dimensions()[2];
  const int64_t KVH = k_pages.dimensions()[0], P = k_pages.dimensions()[1], ps = k_pages.dimensions()[2];
  const int64_t S = block_tables.dimensions()[0], width = block_tables.dimensions()[1];
  if (k_pages.dimensions()[3] != hd || KVH == 0 || H % KVH)
    return ffi::Error::InvalidArgument("k pages must be [KVH, P, ps, hd] with KVH dividing the query heads");
  for (int i = 0; i < 4; ++i)
    if (v_pages.dimensions()[i] != k_pages.dimensions()[i])
      return ffi::Error::InvalidArgument("v pages must have the k pages' shape");
  if (kv_lens.dimensions()[0] != S || cu_q_lens.dimensions()[0] != S + 1)
    return ffi::Error::InvalidArgument("kv_lens must be [S] and cu_q_lens [S + 1]");
  std::fill(out->typed_data(), out->typed_data() + T * H * hd, 0.f);
  const int32_t* cu = cu_q_lens.typed_data();
  const int64_t seqs = std::clamp<int64_t>(num_seqs.typed_data()[0], 0, S);
  for (int64_t s = 0; s < seqs; ++s)
    if (cu[s] < 0 || cu[s + 1] < cu[s] || cu[s + 1] > T)
      return ffi::Error::InvalidArgument("cu_q_lens must be non-decreasing within [0, T]");
  const Attention a{q.typed_data(), k_pages.typed_data(), v_pages.typed_data(), kv_lens.typed_data(),
                    block_tables.typed_data(), cu, out->typed_data(), seqs, KVH, H / KVH, hd, P, ps, width,
                    sm_scale};
  ParallelFor(pool, std::max<int64_t>(1, pool.num_threads()), seqs * KVH,
              [&a](int64_t i) { a.Item(i / a.kv_heads, i % a.kv_heads); });
  return ffi::Error::Success();
}

}  // namespace

// Aliases: template arguments with commas cannot appear in the handler macro.
using F32Rank3 = ffi::Buffer<ffi::F32, 3>;
using F32Rank4 = ffi::Buffer<ffi::F32, 4>;
using S32Vector = ffi::Buffer<ffi::S32, 1>;
using S32Matrix = ffi::Buffer<ffi::S32, 2>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(RidgelineDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Rank3>()   // q [T, H, hd]
                                  .Arg<F32Rank4>()   // k pages [KVH, P, ps, hd]
                                  .Arg<F32Rank4>()   // v pages
                                  .Arg<S32Vector>()  // kv_lens [S]
                                  .Arg<S32Matrix>()  // block_tables [S, maxP]
                                  .Arg<S32Vector>()  // cu_q_lens [S + 1]
                                  .Arg<S32Vector>()  // num_seqs [1]
                                  .Ret<F32Rank3>()   // out [T, H, hd]
                                  .Attr<float>("sm_scale"));
