// Weight-only quantized matmul on the CPU for few rows (decode): out = x @ dequantize(w), float32.
//
// Registered with XLA through jax.ffi (see pallas_kernels/cpu_quantized_matmul.py, which builds this file
// with the system compiler and holds the pure-jnp reference). Weight layouts are ridgeline's
// (pallas_kernels/quantized_matmul.py): K = in_features rows of N = out_features columns, row-major.
//
//   int8 per channel   q int8 [L, K, N],      scales [L, N]            w = scales[n] * q
//   int8 grouped Q8_0  q int8 [L, K, N],      scales [L, K/G, N]       w = scales[k / G, n] * q
//   int4 grouped Q4_1  q uint8 [L, K/2, N],   scales, zeros [L, K/G, N] w = scales * nibble + zeros
//
// Decode streams each weight byte once, so the kernel is a memory-bound sweep. The K rows are cut into
// slices (one contiguous stretch of weight bytes each, shared between the calling thread and XLA's
// intra-op thread pool through an atomic counter: no thread creation per call, a late worker finds no
// slice left and returns); a slice walks its rows in blocks of 16 or 64, and within a block, column tile by
// column tile, converts 16 weights at a time to float and FMAs them into per-row accumulators held in
// registers, with a software prefetch one block ahead. Grouped formats accumulate one group unscaled and
// apply its scale (and the int4 zero point, via sum(x) over the group) once per group and column, so the
// inner loop is convert + FMA only. Slices' partial sums are added in a fixed order, and nothing depends
// on M, so each row's result is the same whatever other rows share the call.
//
// Stacked weights [L, ...] come with a layer index and are read in place: inside the model's layer loop
// XLA would otherwise copy each layer's slice out of the stack before the call.
//
// SIMD comes from GCC/Clang vector extensions compiled with -O3 -march=native: 16-float vectors map to
// one AVX-512 register, two AVX2 ones, or four NEON/SSE ones, so one source serves every host.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using ridgeline::ParallelFor;

namespace {

constexpr int kLanes = 16;
constexpr int64_t kMinBytesPerThread = 384 << 10;  // ~10 us of one core's streaming
// Input rows per K block of a slice: 16 for a few rows (memory-bound: as many weight streams at once), 64
// for more (fewer round trips of the accumulators through `out`). A row's result does not depend on it:
// each output's sum runs in the same order either way.
constexpr int64_t kFewRows = 4, kFewRowsBlock = 16, kManyRowsBlock = 64;
// Software prefetch, one cache line per weight row and column tile: the same place one K block ahead (that
// block's bytes are contiguous, so this covers it whole), or, for rows so wide that this is too far ahead
// to stay cached, kRowPrefetchBytes further along the row. The hardware prefetchers alone streamed
// decode-sized matmuls from DRAM at a third of the bandwidth.
constexpr int64_t kMaxBlockPrefetchBytes = 64 << 10;
constexpr int64_t kRowPrefetchBytes = 512;  // input rows per K block of a slice: as many weight streams at once
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
  const float* xsum;    // [M, K/G] group sums of x (int4, computed by the handler) or nullptr
  float* out;           // [M, N]
  int64_t m, k, n, group;  // group = 0: per channel
  int bits;
  int64_t prefetch = 0;     // bytes ahead of each weight load to prefetch (see kMaxBlockPrefetchBytes)
};

// Rows [r0, r0 + MR) x columns [c0, c0 + NV * 16) of the output, input rows [k0, k1) (whole groups).
// MR rows share each converted weight vector (M > 1 pays the conversion once); the MR * NV accumulators
// (and as many group sums) stay in registers. The first K block of a sum (`first`) starts from zero, later
// ones from the partial sums in `out`; the last (`last`) applies the per-channel scale.
//
// kFromTile (int4 only): the weights come already converted to float from `wt` (ConvertTile: rows
// [k0, k1) of this column tile, NV * 16 floats a row, in input-row order), so many rows pay the nibble
// unpacking once per tile instead of once per register tile (see ColumnTile). The arithmetic is the same
// text either way, so a row gets the same bits on both paths.
template <int MR, int NV, bool kFromTile>
void Tile(const Problem& p, int64_t r0, int64_t c0, int64_t k0, int64_t k1, bool first, bool last,
          const float* wt) {
  const int64_t K = p.k, N = p.n, G = p.group;
  constexpr int64_t TW = NV * kLanes;  // floats per row of wt
  const float* x = p.x + r0 * K;
  float* out = p.out + r0 * N + c0;
  VecF acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = first ? VecF{} : LoadF(out + r * N + v * kLanes);
  // An int8 weight row of this column tile (int8 never comes from a float tile: see ColumnTile).
  auto load_int8_row = [&](int64_t kk, VecF* w) {
    const int8_t* q = static_cast<const int8_t*>(p.q) + c0 + kk * N;
    __builtin_prefetch(q + p.prefetch);
    for (int v = 0; v < NV; ++v) w[v] = LoadS8(q + v * kLanes);
  };

  if (p.bits == 8 && G == 0) {
    for (int64_t kk = k0; kk < k1; ++kk) {
      VecF w[NV];
      load_int8_row(kk, w);
      for (int r = 0; r < MR; ++r) {
        const VecF xv = Splat(x[r * K + kk]);
        for (int v = 0; v < NV; ++v) acc[r][v] += xv * w[v];
      }
    }
    if (last) {
      for (int v = 0; v < NV; ++v) {
        const VecF s = LoadF(p.scales + c0 + v * kLanes);
        for (int r = 0; r < MR; ++r) acc[r][v] *= s;
      }
    }
  } else if (p.bits == 8) {
    for (int64_t g = k0 / G; g < k1 / G; ++g) {
      VecF part[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) part[r][v] = VecF{};
      for (int64_t kk = g * G; kk < (g + 1) * G; ++kk) {
        VecF w[NV];
        load_int8_row(kk, w);
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
        VecF lo[NV], hi[NV];
        if (kFromTile) {
          for (int v = 0; v < NV; ++v) {
            lo[v] = LoadF(wt + (g * G + j - k0) * TW + v * kLanes);
            hi[v] = LoadF(wt + (g * G + half + j - k0) * TW + v * kLanes);
          }
        } else {
          const uint8_t* row = q + (g * half + j) * N;
          __builtin_prefetch(row + p.prefetch);
          for (int v = 0; v < NV; ++v) LoadNibbles(row + v * kLanes, lo[v], hi[v]);
        }
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

// Rows [k0, k1) of an int4 weight's columns [c0, c0 + NV * 16) as floats, NV * 16 a row, in input-row order.
template <int NV>
void ConvertTile(const Problem& p, int64_t c0, int64_t k0, int64_t k1, float* wt) {
  constexpr int64_t TW = NV * kLanes;
  const int64_t N = p.n, G = p.group, half = G / 2;
  const uint8_t* q = static_cast<const uint8_t*>(p.q) + c0;
  for (int64_t g = k0 / G; g < k1 / G; ++g)
    for (int64_t j = 0; j < half; ++j)
      for (int v = 0; v < NV; ++v) {
        VecF lo, hi;
        LoadNibbles(q + (g * half + j) * N + v * kLanes, lo, hi);
        StoreF(wt + (g * G + j - k0) * TW + v * kLanes, lo);
        StoreF(wt + (g * G + half + j - k0) * TW + v * kLanes, hi);
      }
}

// Rows per register tile: per-channel int8 holds MR * NV accumulators, grouped formats twice that.
template <int NV, bool kFromTile>
void RowTiles(const Problem& p, int64_t c0, int64_t k0, int64_t k1, bool first, bool last, const float* wt) {
  int64_t r = 0;
  if (p.group == 0) {
    for (; r + 4 <= p.m; r += 4) Tile<4, NV, kFromTile>(p, r, c0, k0, k1, first, last, wt);
  }
  for (; r + 2 <= p.m; r += 2) Tile<2, NV, kFromTile>(p, r, c0, k0, k1, first, last, wt);
  for (; r < p.m; ++r) Tile<1, NV, kFromTile>(p, r, c0, k0, k1, first, last, wt);
}

// One column tile of a K block for every row. int4 weights for more than kFewRows rows share one conversion
// into a float tile (64 rows x 64 columns: 16 KiB, stays in L1): unpacking nibbles costs more than the
// FMAs it feeds (a 1536 x 1536 matmul at M = 16 / 64: 120 -> 143 / 155 GFLOP/s). int8 converts in
// registers as it goes: one widening load, and the tile's round trip measured 20% slower.
template <int NV>
void ColumnTile(const Problem& p, int64_t c0, int64_t k0, int64_t k1, bool first, bool last) {
  if (p.m <= kFewRows || p.bits == 8) return RowTiles<NV, false>(p, c0, k0, k1, first, last, nullptr);
  thread_local std::unique_ptr<float[]> wt;
  thread_local int64_t wt_size = 0;
  const int64_t size = (k1 - k0) * NV * kLanes;
  if (size > wt_size) wt.reset(new float[wt_size = size]);
  ConvertTile<NV>(p, c0, k0, k1, wt.get());
  RowTiles<NV, true>(p, c0, k0, k1, first, last, wt.get());
}

// Input rows [k0, k1) times output columns [c0, c1) (a multiple of 16 wide), in K blocks of k_block rows;
// within a block every column tile in turn, so each of the block's weight rows is read left to right.
// The block starting at `sum_start` starts the sums; the one ending at `sum_end` applies the scales.
void RunBlock(const Problem& p, int tile_vecs, int64_t k0, int64_t k1, int64_t c0, int64_t c1, int64_t k_block,
              int64_t sum_start, int64_t sum_end) {
  const int64_t tile_cols = tile_vecs * kLanes;
  for (int64_t kb = k0; kb < k1; kb += k_block) {
    const int64_t ke = std::min(k1, kb + k_block);
    const bool first = kb == sum_start, last = ke == sum_end;
    for (int64_t c = c0; c < c1; c += tile_cols) {
      switch (std::min<int64_t>(tile_vecs, (c1 - c) / kLanes)) {
        case 4: ColumnTile<4>(p, c, kb, ke, first, last); break;
        case 3: ColumnTile<3>(p, c, kb, ke, first, last); break;
        case 2: ColumnTile<2>(p, c, kb, ke, first, last); break;
        default: ColumnTile<1>(p, c, kb, ke, first, last); break;
      }
    }
  }
}

// Whole groups of about `rows` input rows (at least one group).
int64_t KBlock(const Problem& p, int64_t rows) {
  const int64_t unit = p.group == 0 ? 1 : p.group;
  return unit * std::max<int64_t>(1, rows / unit);
}

// Work is split along K: slice s sums input rows [s * K / S, (s + 1) * K / S) (whole K blocks) for every
// output column, so each slice streams one contiguous stretch of the weight (a column split would have
// each core read a short piece of every row, which DRAM prefetchers follow far worse: measured 7.5 vs
// ~20 GB/s). Slice 0 sums into `out`, the others into scratch rows that are added to it, in slice order,
// at the end. S depends only on the weight's shape and the pool's size, never on M, so a row's result is
// the same whatever other rows share the call (batch invariance).
struct Job {
  Problem problem;
  int tile_vecs;
  int64_t k_block, slice_rows, num_slices, vec_cols;
  std::unique_ptr<float[]> scratch;  // [num_slices - 1, M, N] (the scalar tail columns unused)

  void Slice(int64_t s) const {
    const int64_t k0 = s * slice_rows, k1 = std::min(problem.k, (s + 1) * slice_rows);
    Problem slice = problem;
    if (s > 0) slice.out = scratch.get() + (s - 1) * problem.m * problem.n;
    RunBlock(slice, tile_vecs, k0, k1, 0, vec_cols, k_block, k0, k1);
  }
};

// Only the first `rows` rows of x are real (the rest pad a step to its compiled shape): they are computed,
// the others set to zero. A row's result is the same either way (nothing depends on M).
ffi::Error Run(ffi::ThreadPool pool, Problem problem, int64_t rows, int64_t tile_vecs, int64_t max_threads) {
  if (tile_vecs < 1 || tile_vecs > 4)
    return ffi::Error::InvalidArgument("tile_vecs must be in 1..4, got " + std::to_string(tile_vecs));
  rows = std::max<int64_t>(0, std::min(rows, problem.m));
  std::fill(problem.out + rows * problem.n, problem.out + problem.m * problem.n, 0.f);
  problem.m = rows;
  if (problem.m == 0 || problem.n == 0) return ffi::Error::Success();
  Job job;
  job.problem = problem;
  job.tile_vecs = static_cast<int>(tile_vecs);
  job.vec_cols = problem.n / kLanes * kLanes;  // columns [vec_cols, N): the scalar tail, done at the end
  job.k_block = KBlock(problem, problem.m <= kFewRows ? kFewRowsBlock : kManyRowsBlock);
  const int64_t block_bytes = job.k_block * problem.n * problem.bits / 8;
  job.problem.prefetch = block_bytes <= kMaxBlockPrefetchBytes ? block_bytes : kRowPrefetchBytes;
  // Slices are whole blocks of the larger size whatever k_block is, so their bounds never depend on M.
  const int64_t slice_unit = KBlock(problem, kManyRowsBlock);
  const int64_t num_units = (problem.k + slice_unit - 1) / slice_unit;
  // Handing work to a pool thread costs microseconds; a small weight streams from one core in about that.
  const int64_t weight_bytes = problem.k * problem.n * problem.bits / 8;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (max_threads > 0) threads = std::min(threads, max_threads);
  // About 4 slices per thread evens out a core that another process slows down.
  const int64_t slices = std::min({4 * threads, num_units, std::max<int64_t>(1, weight_bytes / kMinBytesPerThread)});
  job.slice_rows = (num_units + slices - 1) / slices * slice_unit;
  job.num_slices = (problem.k + job.slice_rows - 1) / job.slice_rows;
  if (job.vec_cols > 0) {
    if (job.num_slices > 1)
      job.scratch.reset(new float[(job.num_slices - 1) * problem.m * problem.n]);
    ParallelFor(pool, threads, job.num_slices, [&job](int64_t s) { job.Slice(s); });
    for (int64_t s = 1; s < job.num_slices; ++s) {
      const float* part = job.scratch.get() + (s - 1) * problem.m * problem.n;
      for (int64_t r = 0; r < problem.m; ++r) {
        float* out = problem.out + r * problem.n;
        const float* add = part + r * problem.n;
        for (int64_t c = 0; c < job.vec_cols; ++c) out[c] += add[c];
      }
    }
  }
  if (job.vec_cols < problem.n) ScalarColumns(problem, job.vec_cols, problem.n);
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

// Layer `layer` of stacked weights [L, ...]: the kernel reads it in place (a 2-D weight is L = 1), so a
// layer loop over stacked arrays needs no per-layer copy of the weights (XLA would make one to slice them).
ffi::Error LayerOffset(const ffi::Buffer<ffi::S32, 0>& layer, int64_t num_layers, int64_t& out) {
  out = *layer.typed_data();
  if (out < 0 || out >= num_layers)
    return ffi::Error::InvalidArgument("layer=" + std::to_string(out) + " must be in [0, " +
                                       std::to_string(num_layers) + ")");
  return ffi::Error::Success();
}

ffi::Error Int8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::S8, 3> q,
                    ffi::AnyBuffer scales, ffi::Buffer<ffi::S32, 0> layer, ffi::Buffer<ffi::S32, 0> rows,
                    ffi::ResultBuffer<ffi::F32, 2> out,
                    int64_t group_size, int64_t tile_vecs, int64_t max_threads) {
  const int64_t num_layers = q.dimensions()[0], k = q.dimensions()[1], n = q.dimensions()[2];
  if (ffi::Error e = CheckCommon(x, k, n, out, group_size, k); e.failure()) return e;
  if (scales.element_type() != ffi::F32) return ffi::Error::InvalidArgument("scales must be float32");
  const int64_t want = group_size == 0 ? n : (k / group_size) * n;
  if (static_cast<int64_t>(scales.element_count()) != num_layers * want)
    return ffi::Error::InvalidArgument("scales must hold " + std::to_string(want) + " values per layer");
  int64_t l;
  if (ffi::Error e = LayerOffset(layer, num_layers, l); e.failure()) return e;
  Problem p{x.typed_data(), q.typed_data() + l * k * n, static_cast<const float*>(scales.untyped_data()) + l * want,
            nullptr, nullptr, out->typed_data(), x.dimensions()[0], k, n, group_size, 8};
  return Run(pool, p, *rows.typed_data(), tile_vecs, max_threads);
}

ffi::Error Int4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::U8, 3> q,
                    ffi::Buffer<ffi::F32, 3> scales, ffi::Buffer<ffi::F32, 3> zeros, ffi::Buffer<ffi::S32, 0> layer,
                    ffi::Buffer<ffi::S32, 0> rows, ffi::ResultBuffer<ffi::F32, 2> out, int64_t group_size,
                    int64_t tile_vecs, int64_t max_threads) {
  const int64_t num_layers = q.dimensions()[0], k = 2 * q.dimensions()[1], n = q.dimensions()[2];
  const int64_t m = x.dimensions()[0];
  if (group_size <= 0 || group_size % 2)
    return ffi::Error::InvalidArgument("int4 needs an even group_size, got " + std::to_string(group_size));
  if (ffi::Error e = CheckCommon(x, k, n, out, group_size, k); e.failure()) return e;
  const int64_t groups = k / group_size;
  for (const auto* a : {&scales, &zeros})
    if (a->dimensions()[0] != num_layers || a->dimensions()[1] != groups || a->dimensions()[2] != n)
      return ffi::Error::InvalidArgument("scales and zeros must be [L, K/G, N]");
  int64_t l;
  if (ffi::Error e = LayerOffset(layer, num_layers, l); e.failure()) return e;
  // Group sums of x (they multiply the zero points), each in one fixed order: a row's result must not
  // depend on the other rows (XLA's reduce of [M, K/G, G] is tiled differently for different M).
  std::unique_ptr<float[]> xsum(new float[m * groups]);
  for (int64_t i = 0; i < m * groups; ++i) {
    const float* xg = x.typed_data() + i * group_size;
    float sum = 0.f;
    for (int64_t j = 0; j < group_size; ++j) sum += xg[j];
    xsum[i] = sum;
  }
  Problem p{x.typed_data(), q.typed_data() + l * (k / 2) * n, scales.typed_data() + l * groups * n,
            zeros.typed_data() + l * groups * n, xsum.get(), out->typed_data(), m, k, n, group_size, 4};
  return Run(pool, p, *rows.typed_data(), tile_vecs, max_threads);
}

// Dequantize one layer of a grouped weight to float32 [K, N] (for M too large for the matmul above: XLA's
// dot then does the math). XLA's own dequantize of grouped / int4 weights ran at a fraction of this speed
// (broadcasts of the group scales, the nibble unpacking). Rows are split over the pool like the matmul's
// slices; math as dequantize_arrays: q * scale (+ zero for int4).
struct DequantJob {
  Problem problem;  // x, xsum, m unused; out is [K, N]

  void Rows(int64_t k0, int64_t k1) const {
    const Problem& p = problem;
    const int64_t N = p.n, G = p.group, vec_end = N / kLanes * kLanes;
    if (p.bits == 8) {
      const int8_t* q = static_cast<const int8_t*>(p.q);
      for (int64_t k = k0; k < k1; ++k) {
        const float* s = p.scales + (G == 0 ? 0 : k / G * N);
        float* o = p.out + k * N;
        int64_t c = 0;
        for (; c < vec_end; c += kLanes) StoreF(o + c, LoadS8(q + k * N + c) * LoadF(s + c));
        for (; c < N; ++c) o[c] = static_cast<float>(q[k * N + c]) * s[c];
      }
      return;
    }
    // int4: packed row g * G/2 + j holds input rows g * G + j (low nibble) and g * G + G/2 + j (high).
    const uint8_t* q = static_cast<const uint8_t*>(p.q);
    const int64_t half = G / 2;
    for (int64_t g = k0 / G; g < k1 / G; ++g) {
      const float* s = p.scales + g * N;
      const float* z = p.zeros + g * N;
      for (int64_t j = 0; j < half; ++j) {
        const uint8_t* row = q + (g * half + j) * N;
        float* lo_out = p.out + (g * G + j) * N;
        float* hi_out = p.out + (g * G + half + j) * N;
        int64_t c = 0;
        for (; c < vec_end; c += kLanes) {
          VecF lo, hi;
          LoadNibbles(row + c, lo, hi);
          const VecF sv = LoadF(s + c), zv = LoadF(z + c);
          StoreF(lo_out + c, lo * sv + zv);
          StoreF(hi_out + c, hi * sv + zv);
        }
        for (; c < N; ++c) {
          lo_out[c] = static_cast<float>(row[c] & 15) * s[c] + z[c];
          hi_out[c] = static_cast<float>(row[c] >> 4) * s[c] + z[c];
        }
      }
    }
  }
};

ffi::Error RunDequant(ffi::ThreadPool pool, const Problem& problem) {
  const DequantJob job{problem};
  const int64_t unit = problem.group == 0 ? 1 : problem.group;
  const int64_t units = problem.k / unit;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t items = std::min(units, 4 * threads);
  const int64_t rows_per_item = (units + items - 1) / items * unit;
  ParallelFor(pool, threads, (problem.k + rows_per_item - 1) / rows_per_item, [&job, rows_per_item](int64_t i) {
    job.Rows(i * rows_per_item, std::min(job.problem.k, (i + 1) * rows_per_item));
  });
  return ffi::Error::Success();
}

ffi::Error DequantInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8, 3> q, ffi::Buffer<ffi::F32, 3> scales,
                           ffi::Buffer<ffi::S32, 0> layer, ffi::ResultBuffer<ffi::F32, 2> out, int64_t group_size) {
  const int64_t num_layers = q.dimensions()[0], k = q.dimensions()[1], n = q.dimensions()[2];
  if (group_size <= 0 || k % group_size)
    return ffi::Error::InvalidArgument("group_size=" + std::to_string(group_size) + " must divide K=" +
                                       std::to_string(k));
  if (scales.dimensions()[0] != num_layers || scales.dimensions()[1] != k / group_size || scales.dimensions()[2] != n)
    return ffi::Error::InvalidArgument("scales must be [L, K/G, N]");
  if (out->dimensions()[0] != k || out->dimensions()[1] != n) return ffi::Error::InvalidArgument("out must be [K, N]");
  int64_t l;
  if (ffi::Error e = LayerOffset(layer, num_layers, l); e.failure()) return e;
  const int64_t groups = k / group_size;
  Problem p{nullptr, q.typed_data() + l * k * n, scales.typed_data() + l * groups * n, nullptr, nullptr,
            out->typed_data(), 0, k, n, group_size, 8};
  return RunDequant(pool, p);
}

ffi::Error DequantInt4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8, 3> q, ffi::Buffer<ffi::F32, 3> scales,
                           ffi::Buffer<ffi::F32, 3> zeros, ffi::Buffer<ffi::S32, 0> layer,
                           ffi::ResultBuffer<ffi::F32, 2> out, int64_t group_size) {
  const int64_t num_layers = q.dimensions()[0], k = 2 * q.dimensions()[1], n = q.dimensions()[2];
  if (group_size <= 0 || group_size % 2 || k % group_size)
    return ffi::Error::InvalidArgument("int4 needs an even group_size dividing K, got " + std::to_string(group_size));
  const int64_t groups = k / group_size;
  for (const auto* a : {&scales, &zeros})
    if (a->dimensions()[0] != num_layers || a->dimensions()[1] != groups || a->dimensions()[2] != n)
      return ffi::Error::InvalidArgument("scales and zeros must be [L, K/G, N]");
  if (out->dimensions()[0] != k || out->dimensions()[1] != n) return ffi::Error::InvalidArgument("out must be [K, N]");
  int64_t l;
  if (ffi::Error e = LayerOffset(layer, num_layers, l); e.failure()) return e;
  Problem p{nullptr, q.typed_data() + l * (k / 2) * n, scales.typed_data() + l * groups * n,
            zeros.typed_data() + l * groups * n, nullptr, out->typed_data(), 0, k, n, group_size, 4};
  return RunDequant(pool, p);
}

}  // namespace

// Aliases: template arguments with commas cannot appear in the handler macros.
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using F32Stack = ffi::Buffer<ffi::F32, 3>;
using S8Stack = ffi::Buffer<ffi::S8, 3>;
using U8Stack = ffi::Buffer<ffi::U8, 3>;
using S32Scalar = ffi::Buffer<ffi::S32, 0>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(RidgelineQMatmulInt8, Int8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()       // x [M, K]
                                  .Arg<S8Stack>()         // q [L, K, N]
                                  .Arg<ffi::AnyBuffer>()  // scales [L, N] or [L, K/G, N]
                                  .Arg<S32Scalar>()       // layer
                                  .Arg<S32Scalar>()       // rows: x's real rows (the rest are padding)
                                  .Ret<F32Matrix>()       // out [M, N]
                                  .Attr<int64_t>("group_size")  // 0: per channel
                                  .Attr<int64_t>("tile_vecs")
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RidgelineQMatmulInt4, Int4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()  // x [M, K]
                                  .Arg<U8Stack>()    // q [L, K/2, N] packed
                                  .Arg<F32Stack>()   // scales [L, K/G, N]
                                  .Arg<F32Stack>()   // zeros [L, K/G, N]
                                  .Arg<S32Scalar>()  // layer
                                  .Arg<S32Scalar>()  // rows: x's real rows (the rest are padding)
                                  .Ret<F32Matrix>()  // out [M, N]
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("tile_vecs")
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RidgelineDequantInt8, DequantInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<S8Stack>()    // q [L, K, N]
                                  .Arg<F32Stack>()   // scales [L, K/G, N]
                                  .Arg<S32Scalar>()  // layer
                                  .Ret<F32Matrix>()  // out [K, N]
                                  .Attr<int64_t>("group_size"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RidgelineDequantInt4, DequantInt4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<U8Stack>()    // q [L, K/2, N] packed
                                  .Arg<F32Stack>()   // scales [L, K/G, N]
                                  .Arg<F32Stack>()   // zeros [L, K/G, N]
                                  .Arg<S32Scalar>()  // layer
                                  .Ret<F32Matrix>()  // out [K, N]
                                  .Attr<int64_t>("group_size"));
