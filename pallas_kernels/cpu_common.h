// What the CPU kernels of the library (see pallas_kernels/cpu_quantized_matmul.py) share: the work queue
// (items handed out one at a time by an atomic counter to the calling thread and XLA's intra-op pool) and
// a vector exp.
#ifndef RIDGELINE_CPU_COMMON_H_
#define RIDGELINE_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ridgeline {

// Runs fn(i) for i in [0, n) on the calling thread and the pool (at most `threads` in all); returns when
// every item has run. Which thread runs an item never changes its result (items write disjoint outputs).
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t threads, int64_t n, Fn fn) {
  struct State {
    State(Fn f, int64_t count) : fn(std::move(f)), n(count) {}
    Fn fn;
    int64_t n;
    std::atomic<int64_t> next{0}, done{0};
    void Work() {
      int64_t finished = 0;
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n; ++finished) fn(i);
      done.fetch_add(finished, std::memory_order_release);
    }
  };
  auto state = std::make_shared<State>(std::move(fn), n);
  // Workers hold the state through their shared_ptr: one that starts after we return finds no item left.
  for (int64_t i = 1; i < std::min(threads, n); ++i) pool.Schedule([state] { state->Work(); });
  state->Work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

#if defined(__AVX512F__)
// exp(x) for x <= 0 (scores minus their max), 16 at a time: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2,
// p a degree-6 Taylor polynomial (relative error ~2e-7); below -87 (so -inf, a masked score) and for NaN
// the result is exactly 0 (the polynomial alone would give ~1e-38 there).
inline __m512 Exp(__m512 x) {
  const __mmask16 in_range = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), 0);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 split: hi + lo
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(in_range, _mm512_scalef_ps(p, n));
}

#endif

}  // namespace ridgeline

#endif  // RIDGELINE_CPU_COMMON_H_
