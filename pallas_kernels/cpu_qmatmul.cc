// Weight-only quantized matmul on the CPU for few rows (decode): out = x @ dequantize(w), float32.
//
// Registered with XLA through jax.ffi (see pallas_kernels/cpu_quantized_matmul.py, which builds this file
// with the system compiler and holds the pure-jnp reference). Weight layouts are ridgeline's
// (pallas_kernels/quantized_matmul.py): K = in_features rows of N = out_features columns, row-major.
//
//   int8 per channel   q int8 [K, N],      scales [N]            w = scales[n] * q
//   int8 grouped Q8_0  q int8 [K, N],      scales [K/G, N]       w = scales[k / G, n] * q
//   int4 grouped Q4_1  q uint8 [K/2, N],   scales, zeros [K/G, N] w = scales * nibble + zeros
//
// Decode streams each weight byte once, so the kernel is a memory-bound sweep: a tile of kTileCols
// output columns walks all K rows, converting 16 weights at a time to float and FMA-ing them into
// per-row accumulators that stay in registers. Grouped formats accumulate one group unscaled and apply
// its scale (and the int4 zero point, via sum(x) over the group) once per group and column, so the
// inner loop is convert + FMA only. Column tiles are shared between the calling thread and XLA's
// intra-op thread pool through an atomic counter (no thread creation per call; a late worker finds
// no tiles left and returns).
//
// SIMD comes from GCC/Clang vector extensions compiled with -O3 -march=native: 16-float vectors map to
// one AVX-512 register, two AVX2 ones, or four NEON/SSE ones, so one source serves every host.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
constexpr int64_t kMinBytesPerThread = 384 << 10;  // ~10 us of one core's streaming
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));

inline VecF LoadF(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void StoreF(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }

#if defined(__AVX512F__)
// GCC 12 scalarizes int8 -> float __builtin_convertvector; the intrinsics are one vpmovsxbd + vcvtdq2ps.
inline VecF LoadS8(const int8_t* p) {
  return (VecF)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// 16 packed bytes -> their low and high nibbles as floats.
inline void LoadNibbles(const uint8_t* p, VecF& lo, VecF& hi) {
  const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = (VecF)_mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(15)));
  hi = (VecF)_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4));
}
#elif defined(__AVX2__)
inline VecF Join(__m256 a, __m256 b) {
  VecF v;
  std::memcpy(&v, &a, sizeof(a));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(a), &b, sizeof(b));
  return v;
}
inline VecF LoadS8(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return Join(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))));
}
inline void LoadNibbles(const uint8_t* p, VecF& lo, VecF& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i w0 = _mm256_cvtepu8_epi32(b), w1 = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
  const __m256i m = _mm256_set1_epi32(15);
  lo = Join(_mm256_cvtepi32_ps(_mm256_and_si256(w0, m)), _mm256_cvtepi32_ps(_mm256_and_si256(w1, m)));
  hi = Join(_mm256_cvtepi32_ps(_mm256_srli_epi32(w0, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(w1, 4)));
}
#else
// Portable (e.g. NEON) path: vector extensions; the compiler picks the instructions.
typedef int8_t VecS8 __attribute__((vector_size(kLanes)));
typedef uint8_t VecU8 __attribute__((vector_size(kLanes)));
typedef int32_t VecS32 __attribute__((vector_size(kLanes * sizeof(int32_t))));
inline VecF LoadS8(const int8_t* p) {
  VecS8 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(__builtin_convertvector(v, VecS32), VecF);
}
inline void LoadNibbles(const uint8_t* p, VecF& lo, VecF& hi) {
  VecU8 v;
  std::memcpy(&v, p, sizeof(v));
  const VecS32 w = __builtin_convertvector(v, VecS32);
  lo = __builtin_convertvector(w & 15, VecF);
  hi = __builtin_convertvector(w >> 4, VecF);
}
#endif
inline VecF Splat(float v) { return VecF{} + v; }

// One problem; pointers are row-major. scales/zeros already float32 (the wrapper casts).
struct Problem {
  const float* x;       // [M, K]
  const void* q;        // int8 [K, N] or uint8 [K/2, N]
  const float* scales;  // [N] (per channel) or [K/G, N]
  const float* zeros;   // [K/G, N] (int4) or nullptr
  const float* xsum;    // [M, K/G] group sums of x (int4) or nullptr
  float* out;           // [M, N]
  int64_t m, k, n, group;  // group = 0: per channel
  int bits;
};

// Rows [r0, r0 + MR) x columns [c0, c0 + NV * 16) of the output, input rows [k0, k1) (whole groups).
// MR rows share each converted weight vector (M > 1 pays the conversion once); the MR * NV accumulators
// (and as many group sums) stay in registers. The first K block starts from zero, later ones from the
// partial sums in `out`; the last applies the per-channel scale.
template <int MR, int NV>
void Tile(const Problem& p, int64_t r0, int64_t c0, int64_t k0, int64_t k1) {
  const int64_t K = p.k, N = p.n, G = p.group;
  const float* x = p.x + r0 * K;
  float* out = p.out + r0 * N + c0;
  VecF acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = k0 == 0 ? VecF{} : LoadF(out + r * N + v * kLanes);

  if (p.bits == 8 && G == 0) {
    const int8_t* q = static_cast<const int8_t*>(p.q) + c0;
    for (int64_t kk = k0; kk < k1; ++kk) {
      VecF w[NV];
      for (int v = 0; v < NV; ++v) w[v] = LoadS8(q + kk * N + v * kLanes);
      for (int r = 0; r < MR; ++r) {
        const VecF xv = Splat(x[r * K + kk]);
        for (int v = 0; v < NV; ++v) acc[r][v] += xv * w[v];
      }
    }
    if (k1 == K) {
      for (int v = 0; v < NV; ++v) {
        const VecF s = LoadF(p.scales + c0 + v * kLanes);
        for (int r = 0; r < MR; ++r) acc[r][v] *= s;
      }
    }
  } else if (p.bits == 8) {
    const int8_t* q = static_cast<const int8_t*>(p.q) + c0;
    for (int64_t g = k0 / G; g < k1 / G; ++g) {
      VecF part[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) part[r][v] = VecF{};
      for (int64_t kk = g * G; kk < (g + 1) * G; ++kk) {
        VecF w[NV];
        for (int v = 0; v < NV; ++v) w[v] = LoadS8(q + kk * N + v * kLanes);
        for (int r = 0; r < MR; ++r) {
          const VecF xv = Splat(x[r * K + kk]);
          for (int v = 0; v < NV; ++v) part[r][v] += xv * w[v];
        }
      }
      for (int v = 0; v < NV; ++v) {
        const VecF s = LoadF(p.scales + g * N + c0 + v * kLanes);
        for (int r = 0; r < MR; ++r) acc[r][v] += part[r][v] * s;
      }
    }
  } else {
    // Half-split nibbles: packed row g*G/2 + j holds input g*G + j (low) and g*G + G/2 + j (high).
    const uint8_t* q = static_cast<const uint8_t*>(p.q) + c0;
    const int64_t half = G / 2, groups = K / G;
    const float* xsum = p.xsum + r0 * groups;
    for (int64_t g = k0 / G; g < k1 / G; ++g) {
      VecF part[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) part[r][v] = VecF{};
      for (int64_t j = 0; j < half; ++j) {
        const uint8_t* row = q + (g * half + j) * N;
        VecF lo[NV], hi[NV];
        for (int v = 0; v < NV; ++v) LoadNibbles(row + v * kLanes, lo[v], hi[v]);
        for (int r = 0; r < MR; ++r) {
          const VecF xl = Splat(x[r * K + g * G + j]), xh = Splat(x[r * K + g * G + half + j]);
          for (int v = 0; v < NV; ++v) part[r][v] += xl * lo[v] + xh * hi[v];
        }
      }
      for (int v = 0; v < NV; ++v) {
        const VecF s = LoadF(p.scales + g * N + c0 + v * kLanes);
        const VecF z = LoadF(p.zeros + g * N + c0 + v * kLanes);
        for (int r = 0; r < MR; ++r) acc[r][v] += part[r][v] * s + z * Splat(xsum[r * groups + g]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) StoreF(out + r * N + v * kLanes, acc[r][v]);
}

// Columns [c0, c1) with c1 - c0 < 16 (the N % 16 tail), one scalar at a time.
void ScalarColumns(const Problem& p, int64_t c0, int64_t c1) {
  const int64_t K = p.k, N = p.n, G = p.group;
  for (int64_t r = 0; r < p.m; ++r) {
    const float* x = p.x + r * K;
    for (int64_t c = c0; c < c1; ++c) {
      float acc = 0.f;
      if (p.bits == 8 && G == 0) {
        const int8_t* q = static_cast<const int8_t*>(p.q);
        for (int64_t kk = 0; kk < K; ++kk) acc += x[kk] * q[kk * N + c];
        acc *= p.scales[c];
      } else if (p.bits == 8) {
        const int8_t* q = static_cast<const int8_t*>(p.q);
        for (int64_t g = 0; g < K / G; ++g) {
          float part = 0.f;
          for (int64_t kk = g * G; kk < (g + 1) * G; ++kk) part += x[kk] * q[kk * N + c];
          acc += part * p.scales[g * N + c];
        }
      } else {
        const uint8_t* q = static_cast<const uint8_t*>(p.q);
        const int64_t half = G / 2, groups = K / G;
        for (int64_t g = 0; g < groups; ++g) {
          float part = 0.f;
          for (int64_t j = 0; j < half; ++j) {
            const uint8_t b = q[(g * half + j) * N + c];
            part += x[g * G + j] * (b & 15) + x[g * G + half + j] * (b >> 4);
          }
          acc += part * p.scales[g * N + c] + p.zeros[g * N + c] * p.xsum[r * groups + g];
        }
      }
      p.out[r * N + c] = acc;
    }
  }
}

// Rows per register tile: per-channel int8 holds MR * NV accumulators, grouped formats twice that.
template <int NV>
void ColumnTile(const Problem& p, int64_t c0, int64_t k0, int64_t k1) {
  int64_t r = 0;
  if (p.group == 0) {
    for (; r + 4 <= p.m; r += 4) Tile<4, NV>(p, r, c0, k0, k1);
  }
  for (; r + 2 <= p.m; r += 2) Tile<2, NV>(p, r, c0, k0, k1);
  for (; r < p.m; ++r) Tile<1, NV>(p, r, c0, k0, k1);
}

// A work item: output columns [c0, c1). Walking K in blocks and, within a block, every column tile of
// the panel reads each weight row's panel bytes contiguously, so the hardware prefetcher streams wide
// matrices (N = 49152: one 64-column tile per row would touch a new 4 KiB page every row).
void RunPanel(const Problem& p, int tile_vecs, int64_t c0, int64_t c1) {
  const int64_t tile_cols = tile_vecs * kLanes;
  const int64_t vec_end = c0 + (c1 - c0) / kLanes * kLanes;  // columns [vec_end, c1): the scalar tail
  // K block: whole groups, about 64 rows (a few KiB of the panel per row block stays in L1 across rows).
  const int64_t unit = p.group == 0 ? 1 : p.group;
  const int64_t k_block = unit * std::max<int64_t>(1, 64 / unit);
  for (int64_t k0 = 0; k0 < p.k; k0 += k_block) {
    const int64_t k1 = std::min(p.k, k0 + k_block);
    for (int64_t c = c0; c < vec_end; c += tile_cols) {
      switch (std::min<int64_t>(tile_vecs, (vec_end - c) / kLanes)) {
        case 4: ColumnTile<4>(p, c, k0, k1); break;
        case 3: ColumnTile<3>(p, c, k0, k1); break;
        case 2: ColumnTile<2>(p, c, k0, k1); break;
        default: ColumnTile<1>(p, c, k0, k1); break;
      }
    }
  }
  if (vec_end < c1) ScalarColumns(p, vec_end, c1);
}

// Panels are handed out through an atomic counter to the calling thread and the pool's workers.
struct Job {
  Problem problem;
  int tile_vecs;
  int64_t panel_cols, num_panels;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    int64_t finished = 0;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < num_panels; ++finished)
      RunPanel(problem, tile_vecs, i * panel_cols, std::min(problem.n, (i + 1) * panel_cols));
    done.fetch_add(finished, std::memory_order_release);
  }
};

ffi::Error Run(ffi::ThreadPool pool, Problem problem, int64_t tile_vecs, int64_t max_threads) {
  if (tile_vecs < 1 || tile_vecs > 4)
    return ffi::Error::InvalidArgument("tile_vecs must be in 1..4, got " + std::to_string(tile_vecs));
  if (problem.m == 0 || problem.n == 0) return ffi::Error::Success();
  const int64_t tile_cols = tile_vecs * kLanes;
  const int64_t num_tiles = (problem.n + tile_cols - 1) / tile_cols;
  // Handing work to a pool thread costs microseconds; a small weight streams from one core in about that.
  const int64_t weight_bytes = problem.k * problem.n * problem.bits / 8;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (max_threads > 0) threads = std::min(threads, max_threads);
  threads = std::min({threads, num_tiles, std::max<int64_t>(1, weight_bytes / kMinBytesPerThread)});
  // About 8 panels per thread: enough to even out a core that another process slows down.
  const int64_t tiles_per_panel = std::max<int64_t>(1, num_tiles / (8 * threads));
  auto job = std::make_shared<Job>();
  job->problem = problem;
  job->tile_vecs = static_cast<int>(tile_vecs);
  job->panel_cols = tiles_per_panel * tile_cols;
  job->num_panels = (num_tiles + tiles_per_panel - 1) / tiles_per_panel;
  // Workers keep the Job alive through their shared_ptr, so one that starts after we return is safe.
  for (int64_t i = 1; i < threads; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->num_panels) std::this_thread::yield();
  return ffi::Error::Success();
}

ffi::Error CheckCommon(const ffi::Buffer<ffi::F32, 2>& x, int64_t k_rows, int64_t n, ffi::ResultBuffer<ffi::F32, 2>& out,
                       int64_t group, int64_t k) {
  if (x.dimensions()[1] != k)
    return ffi::Error::InvalidArgument("x has " + std::to_string(x.dimensions()[1]) + " columns, the weight has K=" +
                                       std::to_string(k) + " rows");
  if (out->dimensions()[0] != x.dimensions()[0] || out->dimensions()[1] != n)
    return ffi::Error::InvalidArgument("out must be [M, N]");
  if (group < 0 || (group > 0 && k % group))
    return ffi::Error::InvalidArgument("group_size=" + std::to_string(group) + " must divide K=" + std::to_string(k));
  (void)k_rows;
  return ffi::Error::Success();
}

ffi::Error Int8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::S8, 2> q,
                    ffi::AnyBuffer scales, ffi::ResultBuffer<ffi::F32, 2> out, int64_t group_size,
                    int64_t tile_vecs, int64_t max_threads) {
  const int64_t k = q.dimensions()[0], n = q.dimensions()[1];
  if (ffi::Error e = CheckCommon(x, k, n, out, group_size, k); e.failure()) return e;
  if (scales.element_type() != ffi::F32) return ffi::Error::InvalidArgument("scales must be float32");
  const int64_t want = group_size == 0 ? n : (k / group_size) * n;
  if (static_cast<int64_t>(scales.element_count()) != want)
    return ffi::Error::InvalidArgument("scales must hold " + std::to_string(want) + " values");
  Problem p{x.typed_data(), q.typed_data(), static_cast<const float*>(scales.untyped_data()), nullptr, nullptr,
            out->typed_data(), x.dimensions()[0], k, n, group_size, 8};
  return Run(pool, p, tile_vecs, max_threads);
}

ffi::Error Int4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::U8, 2> q,
                    ffi::Buffer<ffi::F32, 2> scales, ffi::Buffer<ffi::F32, 2> zeros, ffi::Buffer<ffi::F32, 2> xsum,
                    ffi::ResultBuffer<ffi::F32, 2> out, int64_t group_size, int64_t tile_vecs, int64_t max_threads) {
  const int64_t k = 2 * q.dimensions()[0], n = q.dimensions()[1];
  if (group_size <= 0 || group_size % 2)
    return ffi::Error::InvalidArgument("int4 needs an even group_size, got " + std::to_string(group_size));
  if (ffi::Error e = CheckCommon(x, k, n, out, group_size, k); e.failure()) return e;
  const int64_t groups = k / group_size;
  if (scales.dimensions()[0] != groups || scales.dimensions()[1] != n || zeros.dimensions()[0] != groups ||
      zeros.dimensions()[1] != n)
    return ffi::Error::InvalidArgument("scales and zeros must be [K/G, N]");
  if (xsum.dimensions()[0] != x.dimensions()[0] || xsum.dimensions()[1] != groups)
    return ffi::Error::InvalidArgument("xsum must be [M, K/G]");
  Problem p{x.typed_data(), q.typed_data(), scales.typed_data(), zeros.typed_data(), xsum.typed_data(),
            out->typed_data(), x.dimensions()[0], k, n, group_size, 4};
  return Run(pool, p, tile_vecs, max_threads);
}

}  // namespace

// Aliases: template arguments with commas cannot appear in the handler macros.
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using S8Matrix = ffi::Buffer<ffi::S8, 2>;
using U8Matrix = ffi::Buffer<ffi::U8, 2>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(RidgelineQMatmulInt8, Int8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()  // x [M, K]
                                  .Arg<S8Matrix>()   // q [K, N]
                                  .Arg<ffi::AnyBuffer>()            // scales [N] or [K/G, N]
                                  .Ret<F32Matrix>()  // out [M, N]
                                  .Attr<int64_t>("group_size")      // 0: per channel
                                  .Attr<int64_t>("tile_vecs")
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RidgelineQMatmulInt4, Int4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()  // x [M, K]
                                  .Arg<U8Matrix>()   // q [K/2, N] packed
                                  .Arg<F32Matrix>()  // scales [K/G, N]
                                  .Arg<F32Matrix>()  // zeros [K/G, N]
                                  .Arg<F32Matrix>()  // xsum [M, K/G]
                                  .Ret<F32Matrix>()  // out [M, N]
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("tile_vecs")
                                  .Attr<int64_t>("max_threads"));
