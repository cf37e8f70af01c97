// The sampler's kernels on the CPU: the k largest values of each row (top-k / top-p candidates), the exact
// min-p -> top-k -> top-p cut-off of the rows those candidates do not settle, and the inverse-CDF draw.
//
// Registered with XLA through jax.ffi, built into the same library as cpu_qmatmul.cc (see
// pallas_kernels/cpu_quantized_matmul.py); called by pallas_kernels/cpu_top_k.py. References:
// jax.lax.top_k(x, k)[0], the sampler's bisection (inference/sampler.py, _bisect_threshold) and _draw. Why:
// XLA:CPU's TopK sorts (value, index) pairs per row, ~80 us per 49k-entry row (5 ms of a 64-row sampler
// step), the bisection makes 32 passes over a row per cut-off (~0.4 ms a row), and XLA's draw writes the
// masked logits and their weights out as [B, V] arrays before summing them.
//
// Candidates: one pass per row keeps a buffer of the values above a running threshold (the k-th largest
// kept so far): 16 compares per instruction, and only the few values that beat it are stored; the buffer
// is cut back to its k largest when full. Then, while the row is in cache, the survivors' mass.
//   x       [B, V]  float32; top_k [B] int32 (V = off); floor [B] float32 (min-p's cut-off)
//   values  [B, k]  float32, each row's k largest values in descending order, repeated values repeated
//                   (jax.lax.top_k's values); NaN is never selected, and a row with fewer than k non-NaN
//                   values is padded with -inf
//   mass    [B]     float32, sum of exp(x - values[0]) over x >= max(floor, values[top_k - 1]) (the
//                   top_k-th value only where top_k <= k and top_k < V), summed in double; 0 for an
//                   all -inf row. Each row is computed on its own.
//
// Cut-off: per selected row, kth = max(floor, the top_k-th largest value) unless given, then with top_p < 1
// the value c with mass(x > c) < top_p * mass(x >= kth) <= mass(x >= c), masses of exp(x - max) (the
// nucleus' last value, ties kept): a quickselect on value that carries the mass above the current range,
// O(V) expected, sums in double.
//   scaled [B, V] f32; top_k [B] i32 in 1..V; top_p, floor, kth [B] f32; kth_known, rows [B] i32 (0/1)
//   out    [B] f32: the cut-off of every row with rows[b] != 0, -inf elsewhere
//
// Draw (see DrawImpl): block masses summed in one pass, the chosen block's weights recomputed.
//   scaled [B, V] f32; cutoff, row_max [B] f32; uniforms [B, 2] f32 in [0, 1)
//   out    [B] i32: the drawn token of each row

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
#if defined(__AVX512F__)
using ridgeline::Exp;
#endif
using ridgeline::ParallelFor;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The k largest of row[0, n) into out[0, k), descending; buf holds cap + 16 floats.
void TopValues(const float* row, int64_t n, int64_t k, int64_t cap, float* buf, float* out) {
  int64_t size = 0;
  float threshold = kNegInf;  // once k values are held, only larger ones can change the top k's values
  auto shrink = [&] {         // keep the k largest held values; the k-th becomes the threshold
    std::nth_element(buf, buf + k - 1, buf + size, std::greater<float>());
    size = k;
    threshold = buf[k - 1];
  };
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 t = _mm512_set1_ps(threshold);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(row + i);
    const __mmask16 above = _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ);  // false for NaN
    if (above == 0) continue;
    _mm512_mask_compressstoreu_ps(buf + size, above, v);
    size += __builtin_popcount(above);
    if (size >= cap) {
      shrink();
      t = _mm512_set1_ps(threshold);
    }
  }
#endif
  for (; i < n; ++i) {
    if (row[i] > threshold) {  // false for NaN
      buf[size++] = row[i];
      if (size >= cap) shrink();
    }
  }
  if (size > k) shrink();
  std::sort(buf, buf + size, std::greater<float>());
  std::copy(buf, buf + size, out);
  std::fill(out + size, out + k, kNegInf);  // only -inf (or NaN) was left out: -inf pads
}

// x >= kth survivors of a row as (value, exp(value - row max)) pairs, NaN left out.
struct Weighted {
  float v, w;
};

// The nucleus cut-off of items[0, n) (see the header), given the mass `above` of the values above them
// (< target): quickselect on value, three-way partitions.
float NucleusCutoff(Weighted* items, int64_t n, double above, double target) {
  int64_t lo = 0, hi = n;
  float pivot = items[0].v;
  while (lo < hi) {
    const float a = items[lo].v, b = items[lo + (hi - lo) / 2].v, c = items[hi - 1].v;
    pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
    // [lo, g) > pivot, [g, e) == pivot, [e, hi) < pivot
    int64_t g = lo, i = lo, e = hi;
    double mass_greater = 0, mass_equal = 0;
    while (i < e) {
      const float v = items[i].v;
      if (v > pivot) {
        mass_greater += items[i].w;
        std::swap(items[i++], items[g++]);
      } else if (v < pivot) {
        std::swap(items[i], items[--e]);
      } else {
        mass_equal += items[i++].w;
      }
    }
    if (above + mass_greater >= target) {
      hi = g;  // the nucleus ends above the pivot
    } else if (above + mass_greater + mass_equal >= target) {
      return pivot;
    } else {
      above += mass_greater + mass_equal;
      lo = e;
    }
  }
  return pivot;  // rounding left target above the whole mass: the smallest value closes the nucleus
}

// Values within this many nats of the row maximum are stored by the first pass (the rest only summed):
// the nucleus usually ends among them, and then the quickselect runs over them alone.
constexpr float kBand = 12.f;

// Survivors x >= kth of row[0, n) with lo < x <= hi into items (NaN left out); returns their number and
// adds their masses exp(x - row_max) to *mass.
int64_t Collect(const float* row, int64_t n, float kth, float row_max, float lo, float hi, Weighted* items,
                double* mass) {
  int64_t m = 0, i = 0;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(row_max), kv = _mm512_set1_ps(kth);
  const __m512 lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi);
  alignas(64) float w16[16];
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(row + i);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, kv, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, lov, _CMP_GT_OQ) &
                           _mm512_cmp_ps_mask(v, hiv, _CMP_LE_OQ);  // false for NaN
    if (keep == 0) continue;
    _mm512_store_ps(w16, Exp(_mm512_sub_ps(v, mv)));
    for (unsigned bits = keep; bits; bits &= bits - 1) {
      const int j = __builtin_ctz(bits);
      items[m++] = {row[i + j], w16[j]};
      *mass += w16[j];
    }
  }
#endif
  for (; i < n; ++i)
    if (row[i] >= kth && row[i] > lo && row[i] <= hi) {
      const float w = std::exp(row[i] - row_max);
      items[m++] = {row[i], w};
      *mass += w;
    }
  return m;
}

// The mass of the survivors x >= kth: exp(x - row_max) summed 16 lanes at a time.
double SurvivorMass(const float* row, int64_t n, float kth, float row_max) {
  double total = 0;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(row_max), kv = _mm512_set1_ps(kth);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(row + i);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, kv, _CMP_GE_OQ);
    total += _mm512_mask_reduce_add_ps(keep, Exp(_mm512_maskz_sub_ps(keep, v, mv)));
  }
#endif
  for (; i < n; ++i)
    if (row[i] >= kth) total += std::exp(row[i] - row_max);
  return total;
}

float RowCutoff(const float* row, int64_t n, int64_t top_k, float top_p, float floor, float kth, bool kth_known,
                Weighted* items, float* values) {
  float row_max = kNegInf;
  for (int64_t i = 0; i < n; ++i) row_max = std::max(row_max, row[i]);  // std::max skips a NaN row[i]
  if (!kth_known) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i)
      if (!std::isnan(row[i])) values[m++] = row[i];
    float kth_value = kNegInf;
    if (top_k <= m) {
      std::nth_element(values, values + top_k - 1, values + m, std::greater<float>());
      kth_value = values[top_k - 1];
    }
    kth = std::max(floor, kth_value);
  }
  if (top_p >= 1.f || row_max == kNegInf) return kth;
  const float inf = std::numeric_limits<float>::infinity(), band = row_max - kBand;
  const double target = static_cast<double>(top_p) * SurvivorMass(row, n, kth, row_max);
  double near_mass = 0;
  const int64_t near = Collect(row, n, kth, row_max, band, inf, items, &near_mass);
  if (near_mass >= target) return NucleusCutoff(items, near, 0.0, target);
  // The nucleus reaches below the band: the rest of the survivors (-inf ones weigh nothing).
  float smallest = inf;
  for (int64_t i = 0; i < near; ++i) smallest = std::min(smallest, items[i].v);
  double far_mass = 0;
  const int64_t far = Collect(row, n, kth, row_max, -inf, band, items, &far_mass);
  return far == 0 ? smallest : NucleusCutoff(items, far, near_mass, target);
}

ffi::Error FilterCutoffImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> scaled, ffi::Buffer<ffi::S32, 1> top_k,
                            ffi::Buffer<ffi::F32, 1> top_p, ffi::Buffer<ffi::F32, 1> floor, ffi::Buffer<ffi::F32, 1> kth,
                            ffi::Buffer<ffi::S32, 1> kth_known, ffi::Buffer<ffi::S32, 1> rows,
                            ffi::ResultBuffer<ffi::F32, 1> out) {
  const int64_t b = scaled.dimensions()[0], n = scaled.dimensions()[1];
  for (auto d : {top_k.dimensions()[0], top_p.dimensions()[0], floor.dimensions()[0], kth.dimensions()[0],
                 kth_known.dimensions()[0], rows.dimensions()[0], out->dimensions()[0]})
    if (d != b) return ffi::Error::InvalidArgument("every per-row operand must have scaled's B rows");
  float* o = out->typed_data();
  std::vector<int64_t> selected;
  for (int64_t r = 0; r < b; ++r) {
    o[r] = kNegInf;
    if (rows.typed_data()[r]) selected.push_back(r);
  }
  const float* x = scaled.typed_data();
  ParallelFor(pool, std::max<int64_t>(1, pool.num_threads()), static_cast<int64_t>(selected.size()), [&](int64_t i) {
    thread_local std::unique_ptr<Weighted[]> items;
    thread_local std::unique_ptr<float[]> values;
    thread_local int64_t capacity = 0;
    if (n > capacity) {
      items.reset(new Weighted[n]);
      values.reset(new float[n]);
      capacity = n;
    }
    const int64_t r = selected[i];
    const int64_t k = std::clamp<int64_t>(top_k.typed_data()[r], 1, n);
    o[r] = RowCutoff(x + r * n, n, k, top_p.typed_data()[r], floor.typed_data()[r], kth.typed_data()[r],
                     kth_known.typed_data()[r] != 0, items.get(), values.get());
  });
  return ffi::Error::Success();
}

ffi::Error CandidatesImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::S32, 1> top_k,
                          ffi::Buffer<ffi::F32, 1> floor, ffi::ResultBuffer<ffi::F32, 2> out,
                          ffi::ResultBuffer<ffi::F32, 1> mass) {
  const int64_t rows = x.dimensions()[0], n = x.dimensions()[1], k = out->dimensions()[1];
  if (out->dimensions()[0] != rows || top_k.dimensions()[0] != rows || floor.dimensions()[0] != rows ||
      mass->dimensions()[0] != rows)
    return ffi::Error::InvalidArgument("top_k, floor, out and mass must have x's rows");
  if (k < 1 || k > n)
    return ffi::Error::InvalidArgument("k=" + std::to_string(k) + " must be in [1, V=" + std::to_string(n) + "]");
  // A larger buffer shrinks less often; 4k amortises each O(cap) cut over >= 3k stored values.
  const int64_t cap = std::max<int64_t>(4 * k, 256);
  const float* src = x.typed_data();
  float* dst = out->typed_data();
  float* mass_out = mass->typed_data();
  const int32_t* ks = top_k.typed_data();
  const float* floors = floor.typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  ParallelFor(pool, threads, rows, [=](int64_t r) {
    thread_local std::unique_ptr<float[]> buf;
    thread_local int64_t buf_size = 0;
    if (cap + 16 > buf_size) buf.reset(new float[buf_size = cap + 16]);
    const float* row = src + r * n;
    float* values = dst + r * k;
    TopValues(row, n, k, cap, buf.get(), values);
    // The survivors' mass while the row is still in cache: top-k's k-th value where the candidates hold it.
    const float kth = std::max(floors[r], ks[r] >= 1 && ks[r] <= k && ks[r] < n ? values[ks[r] - 1] : kNegInf);
    mass_out[r] = values[0] == kNegInf ? 0.f : static_cast<float>(SurvivorMass(row, n, kth, values[0]));
  });
  return ffi::Error::Success();
}

// The inverse-CDF draw of inference/sampler.py (_draw), fused: the weights exp(x - row_max) of x >= cutoff
// are summed per block of kDrawBlock without being stored, one uniform picks the block by its mass and the
// other a token inside it (the block's weights recomputed). Sums in float32, 16 lanes then in order.
constexpr int64_t kDrawBlock = 256;

// The index i with cum[i - 1] <= u * total < cum[i] over w[0, n), clamped to the last positive weight
// (u * total can round up to the total): the rule of the sampler's _inverse_cdf.
int64_t InverseCdf(const float* w, int64_t n, float u) {
  float total = 0;
  int64_t last = 0;
  for (int64_t i = 0; i < n; ++i) {
    total += w[i];
    if (w[i] > 0) last = i;
  }
  const float target = u * total;
  float cum = 0;
  for (int64_t i = 0; i < n; ++i) {
    cum += w[i];
    if (cum > target) return std::min(i, last);
  }
  return last;
}

// Weights of row[b0, b1) (exp(x - row_max) where x >= cutoff, else 0) into w; returns their sum.
float BlockWeights(const float* row, int64_t b0, int64_t b1, float cutoff, float row_max, float* w) {
  float sum = 0;
  int64_t i = b0;
#if defined(__AVX512F__)
  const __m512 cv = _mm512_set1_ps(cutoff), mv = _mm512_set1_ps(row_max);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= b1; i += 16) {
    const __m512 v = _mm512_loadu_ps(row + i);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, cv, _CMP_GE_OQ);
    // Exp gives -inf (a banned token) exactly 0.
    const __m512 e = _mm512_maskz_mov_ps(keep, Exp(_mm512_maskz_sub_ps(keep, v, mv)));
    if (w != nullptr) _mm512_storeu_ps(w + (i - b0), e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < b1; ++i) {
    const float e = row[i] >= cutoff ? std::exp(row[i] - row_max) : 0.f;
    if (w != nullptr) w[i - b0] = e;
    sum += e;
  }
  return sum;
}

ffi::Error DrawImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> scaled, ffi::Buffer<ffi::F32, 1> cutoff,
                    ffi::Buffer<ffi::F32, 1> row_max, ffi::Buffer<ffi::F32, 2> uniforms,
                    ffi::ResultBuffer<ffi::S32, 1> out) {
  const int64_t b = scaled.dimensions()[0], n = scaled.dimensions()[1];
  if (cutoff.dimensions()[0] != b || row_max.dimensions()[0] != b || out->dimensions()[0] != b ||
      uniforms.dimensions()[0] != b || uniforms.dimensions()[1] != 2)
    return ffi::Error::InvalidArgument("cutoff, row_max and out must be [B], uniforms [B, 2]");
  const int64_t blocks = (n + kDrawBlock - 1) / kDrawBlock;
  const float* x = scaled.typed_data();
  const float* cut = cutoff.typed_data();
  const float* mx = row_max.typed_data();
  const float* u = uniforms.typed_data();
  int32_t* o = out->typed_data();
  ParallelFor(pool, std::max<int64_t>(1, pool.num_threads()), b, [=](int64_t r) {
    thread_local std::unique_ptr<float[]> mass;
    thread_local int64_t capacity = 0;
    if (blocks + kDrawBlock > capacity) mass.reset(new float[capacity = blocks + kDrawBlock]);
    const float* row = x + r * n;
    for (int64_t j = 0; j < blocks; ++j)
      mass[j] = BlockWeights(row, j * kDrawBlock, std::min(n, (j + 1) * kDrawBlock), cut[r], mx[r], nullptr);
    const int64_t block = InverseCdf(mass.get(), blocks, u[2 * r]);
    float* w = mass.get() + blocks;
    const int64_t b0 = block * kDrawBlock, b1 = std::min(n, b0 + kDrawBlock);
    BlockWeights(row, b0, b1, cut[r], mx[r], w);
    o[r] = static_cast<int32_t>(b0 + InverseCdf(w, b1 - b0, u[2 * r + 1]));
  });
  return ffi::Error::Success();
}

}  // namespace

using F32Matrix = ffi::Buffer<ffi::F32, 2>;

using S32Vector = ffi::Buffer<ffi::S32, 1>;
using F32Vector = ffi::Buffer<ffi::F32, 1>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(RidgelineCandidates, CandidatesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()   // x [B, V]
                                  .Arg<S32Vector>()   // top_k [B]
                                  .Arg<F32Vector>()   // floor [B]
                                  .Ret<F32Matrix>()   // values [B, k]
                                  .Ret<F32Vector>());  // mass [B]

XLA_FFI_DEFINE_HANDLER_SYMBOL(RidgelineFilterCutoff, FilterCutoffImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()   // scaled [B, V]
                                  .Arg<S32Vector>()   // top_k [B]
                                  .Arg<F32Vector>()   // top_p [B]
                                  .Arg<F32Vector>()   // floor [B]
                                  .Arg<F32Vector>()   // kth [B]
                                  .Arg<S32Vector>()   // kth_known [B]
                                  .Arg<S32Vector>()   // rows [B]
                                  .Ret<F32Vector>());  // out [B]

XLA_FFI_DEFINE_HANDLER_SYMBOL(RidgelineDraw, DrawImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()   // scaled [B, V]
                                  .Arg<F32Vector>()   // cutoff [B]
                                  .Arg<F32Vector>()   // row_max [B]
                                  .Arg<F32Matrix>()   // uniforms [B, 2]
                                  .Ret<S32Vector>());  // tokens [B]
