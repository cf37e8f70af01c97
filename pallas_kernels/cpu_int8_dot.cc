// W8A8 matmul on the CPU: int8 weights times dynamically int8-quantized activations, as int32 dot products
// with AVX-512 VNNI (vpdpbusd), so a batched step runs at the integer-dot rate instead of the float-FMA one.
//
// Registered with XLA through jax.ffi by pallas_kernels/cpu_quantized_matmul.py (same library as the
// weight-only kernel of cpu_qmatmul.cc), which also holds the pure-jnp reference (dequantized activations
// times the dequantized weight). Math, with B = the activation block (inputs per activation scale):
//
//   amax[m, b] = max |x[m, bB : (b+1)B]|,  sa = amax / 127,  qa = round_half_even(x * (127 / amax))  (0 if amax = 0)
//   dot[m, b, n] = sum_{k in block b} qa[m, k] * q[k, n]                                          (exact int32)
//   per channel:  y[m, n] = scales[n] * sum_b dot * sa[m, b]      grouped (G = B):  y = sum_b dot * sa[m, b] * scales[b, n]
//
// vpdpbusd multiplies unsigned by signed bytes: the weights go in biased (q + 128, one xor), and the bias comes
// back out exactly per block: 128 * sum_{k in b} qa[m, k]. Four weight rows of 64 columns interleave (two
// unpack rounds) into the [column][4 inputs] byte order the instruction wants; the column order this leaves
// inside a register (vector j, 128-bit lane L holds columns 16L + 4j .. 16L + 4j + 3) is undone by a 4 x 4
// lane transpose when a tile's floats are written out.
//
// Work: K is cut into slices that depend only on the weight's shape and the pool (as in cpu_qmatmul.cc); a
// slice's float sum for a row is the same whichever way the call is split, and slices are added in order,
// so a row's result does not depend on the other rows (batch invariance). Few rows (decode): threads take
// slices (each streams a contiguous stretch of the weight) into scratch rows added at the end. Many rows:
// threads take (64-column tile, row chunk) items and walk the slices in order, with the tile's weight strip
// interleaved once into a buffer that every row of the chunk reuses.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using ridgeline::ParallelFor;

extern "C" int RidgelineHasInt8Dot() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return 1;
#else
  return 0;
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
namespace {

constexpr int64_t kTileCols = 64;         // one 64-byte weight line per input row
constexpr int64_t kFewRows = 8;           // up to this many rows: the slice split (memory-bound)
constexpr int64_t kRowChunk = 64;         // rows per work item of the many-row split
constexpr int64_t kMinBytesPerSlice = 384 << 10;
// Columns per panel of the few-row sweep: a wide weight (the LM head's 49152) is swept panel by panel, so
// that a pass over `step` rows of a panel stays small (see FewRowsStep) and its sums stay in L1/L2.
constexpr int64_t kPanelCols = 4096;
constexpr int64_t kStripPrefetchRows = 32;  // many rows: weight rows ahead when interleaving a tile's strip

struct Problem {
  const int8_t* qa;     // [M, K] quantized activations
  const float* sa;      // [M, K/B] activation scales
  const int32_t* bias;  // [M, K/B] 128 * sum of qa over each block
  const int8_t* q;      // [K, N] weights
  const float* scales;  // [N] (per channel) or [K/B, N] (grouped, G = B)
  float* out;           // [M, N]
  int64_t m, k, n, block;
  bool grouped;
  int64_t slice_rows, num_slices;  // K slices (whole blocks)
  int64_t prefetch;                // bytes ahead of a direct weight load to prefetch (few rows: one pass)
};

// Rows k .. k+3 of the weight at columns [c, c + 64), biased to unsigned and interleaved for vpdpbusd.
inline void Interleave(const int8_t* q, int64_t n, __m512i w[4]) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i r0 = _mm512_xor_si512(_mm512_loadu_si512(q), flip);
  const __m512i r1 = _mm512_xor_si512(_mm512_loadu_si512(q + n), flip);
  const __m512i r2 = _mm512_xor_si512(_mm512_loadu_si512(q + 2 * n), flip);
  const __m512i r3 = _mm512_xor_si512(_mm512_loadu_si512(q + 3 * n), flip);
  const __m512i t0 = _mm512_unpacklo_epi8(r0, r1), t1 = _mm512_unpackhi_epi8(r0, r1);
  const __m512i t2 = _mm512_unpacklo_epi8(r2, r3), t3 = _mm512_unpackhi_epi8(r2, r3);
  w[0] = _mm512_unpacklo_epi16(t0, t2);
  w[1] = _mm512_unpackhi_epi16(t0, t2);
  w[2] = _mm512_unpacklo_epi16(t1, t3);
  w[3] = _mm512_unpackhi_epi16(t1, t3);
}

// The 4 x 4 transpose of 128-bit lanes between the interleaved column order and the natural one (its own
// inverse).
inline void TransposeLanes(__m512 v[4]) {
  const __m512 t0 = _mm512_shuffle_f32x4(v[0], v[1], 0x44), t1 = _mm512_shuffle_f32x4(v[0], v[1], 0xEE);
  const __m512 t2 = _mm512_shuffle_f32x4(v[2], v[3], 0x44), t3 = _mm512_shuffle_f32x4(v[2], v[3], 0xEE);
  v[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
  v[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
  v[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
  v[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
}

inline void LoadScalesInterleaved(const float* s, __m512 v[4]) {
  for (int j = 0; j < 4; ++j) v[j] = _mm512_loadu_ps(s + 16 * j);
  TransposeLanes(v);
}

// One activation block (input rows [kb, kb + B)) of MR rows x one 64-column tile: int32 sums in registers,
// then folded into the rows' float sums `fsum` (interleaved order, 64 floats a row). The weights come from
// `wt` (kBuffered: the block's quads pre-interleaved, 4 vectors each) or straight from the weight, with a
// software prefetch `prefetch` bytes ahead.
// acc0..3 += the unsigned weight bytes w[0..3] times the broadcast signed activation bytes a. In asm because
// GCC 12 keeps the intrinsic's accumulators moving between registers (or through the stack) every iteration.
inline void Dot4(__m512i& acc0, __m512i& acc1, __m512i& acc2, __m512i& acc3, const __m512i* w, __m512i a) {
  __asm__("vpdpbusd %4, %5, %0\n\tvpdpbusd %4, %6, %1\n\tvpdpbusd %4, %7, %2\n\tvpdpbusd %4, %8, %3"
          : "+v"(acc0), "+v"(acc1), "+v"(acc2), "+v"(acc3)
          : "v"(a), "v"(w[0]), "v"(w[1]), "v"(w[2]), "v"(w[3]));
}

inline __m512i Broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Row r's accumulator j from `load` where the tile has that row, else zero (a row the template does not use).
template <typename Load>
inline __m512i z4(bool used, Load& load, int r, int j) {
  return used ? load(r, j) : _mm512_setzero_si512();
}

// Weight rows per pass of the few-row sweep (every column tile in turn over these rows): the largest whole
// number of quads dividing the block whose bytes stay within ~20 KiB. Measured at M = 1 on DRAM-resident
// weights: 576 x 1536 best with 8 rows (12 KiB; 16 rows 25% slower), 1536 x 576 with 32 (18 KiB; 8 rows 50%
// slower), the 576 x 49152 head with 4 rows in 4096-column panels (32 rows of the whole width: 1.6x slower).
inline int64_t FewRowsStep(int64_t block, int64_t n) {
  int64_t step = 4;
  for (int64_t s = 8; s <= block; s += 4)
    if (block % s == 0 && s * n <= (20 << 10)) step = s;
  return step;
}

template <int MR, bool kBuffered>
void Block(const Problem& p, int64_t r0, int64_t c0, int64_t kb, int64_t ke, const __m512i* wt, float* fsum,
           int32_t* isum) {
  static_assert(MR >= 1 && MR <= 4, "rows per register tile");
  const int64_t K = p.k, N = p.n, B = p.block, b = kb / B, nb = K / B;
  // Named accumulators (rows 0..3 x 4 vectors), not an array: see Dot4. Unused rows compile away. A part of
  // a block that does not start it continues the int32 sums parked in isum by the part before.
  const bool starts = kb % B == 0, ends = ke % B == 0;
  auto load = [&](int r, int j) {
    return starts ? _mm512_setzero_si512() : _mm512_loadu_si512(isum + r * kTileCols + 16 * j);
  };
  __m512i a00 = load(0, 0), a01 = load(0, 1), a02 = load(0, 2), a03 = load(0, 3);
  __m512i a10 = z4(MR > 1, load, 1, 0), a11 = z4(MR > 1, load, 1, 1), a12 = z4(MR > 1, load, 1, 2),
          a13 = z4(MR > 1, load, 1, 3);
  __m512i a20 = z4(MR > 2, load, 2, 0), a21 = z4(MR > 2, load, 2, 1), a22 = z4(MR > 2, load, 2, 2),
          a23 = z4(MR > 2, load, 2, 3);
  __m512i a30 = z4(MR > 3, load, 3, 0), a31 = z4(MR > 3, load, 3, 1), a32 = z4(MR > 3, load, 3, 2),
          a33 = z4(MR > 3, load, 3, 3);
  const int8_t* qa = p.qa + r0 * K + kb;
  const int8_t* q = p.q + kb * N + c0;
  for (int64_t i = 0; i < ke - kb; i += 4) {
    __m512i w[4];
    if constexpr (kBuffered) {
      for (int j = 0; j < 4; ++j) w[j] = _mm512_load_si512(wt + i + j);
    } else {
      const int8_t* row = q + i * N;
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(row + j * N + p.prefetch), _MM_HINT_T0);
      Interleave(row, N, w);
    }
    Dot4(a00, a01, a02, a03, w, Broadcast4(qa + i));
    if constexpr (MR > 1) Dot4(a10, a11, a12, a13, w, Broadcast4(qa + K + i));
    if constexpr (MR > 2) Dot4(a20, a21, a22, a23, w, Broadcast4(qa + 2 * K + i));
    if constexpr (MR > 3) Dot4(a30, a31, a32, a33, w, Broadcast4(qa + 3 * K + i));
  }
  const __m512i acc[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
  if (!ends) {
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) _mm512_storeu_si512(isum + r * kTileCols + 16 * j, acc[r][j]);
    return;
  }
  __m512 s[4];
  if (p.grouped) LoadScalesInterleaved(p.scales + b * N + c0, s);
  for (int r = 0; r < MR; ++r) {
    const __m512i bias = _mm512_set1_epi32(p.bias[(r0 + r) * nb + b]);
    const __m512 sa = _mm512_set1_ps(p.sa[(r0 + r) * nb + b]);
    for (int j = 0; j < 4; ++j) {
      __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][j], bias)), sa);
      if (p.grouped) f = _mm512_mul_ps(f, s[j]);
      float* dst = fsum + r * kTileCols + 16 * j;
      _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), f));
    }
  }
}

// Writes (first slice) or adds `rows` rows of a slice's float sums to out, in natural column order, applying
// the per-channel scale.
inline void Emit(const Problem& p, int64_t r0, int64_t rows, int64_t c0, const float* fsum, float* out, bool add) {
  __m512 s[4];
  if (!p.grouped)
    for (int j = 0; j < 4; ++j) s[j] = _mm512_loadu_ps(p.scales + c0 + 16 * j);
  for (int64_t r = 0; r < rows; ++r) {
    __m512 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm512_loadu_ps(fsum + r * kTileCols + 16 * j);
    TransposeLanes(v);
    float* o = out + (r0 + r) * p.n + c0;
    for (int j = 0; j < 4; ++j) {
      if (!p.grouped) v[j] = _mm512_mul_ps(v[j], s[j]);
      if (add) v[j] = _mm512_add_ps(v[j], _mm512_loadu_ps(o + 16 * j));
      _mm512_storeu_ps(o + 16 * j, v[j]);
    }
  }
}

// Rows [r0, r1) of one tile and activation block, MR at a time.
template <bool kBuffered>
void BlockRows(const Problem& p, int64_t r0, int64_t r1, int64_t c0, int64_t kb, int64_t ke, const __m512i* wt,
               float* fsum, int32_t* isum) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4)
    Block<4, kBuffered>(p, r, c0, kb, ke, wt, fsum + (r - r0) * kTileCols, isum + (r - r0) * kTileCols);
  for (; r + 2 <= r1; r += 2)
    Block<2, kBuffered>(p, r, c0, kb, ke, wt, fsum + (r - r0) * kTileCols, isum + (r - r0) * kTileCols);
  for (; r < r1; ++r)
    Block<1, kBuffered>(p, r, c0, kb, ke, wt, fsum + (r - r0) * kTileCols, isum + (r - r0) * kTileCols);
}

// Columns [c0, c1) (fewer than 64: the N % 64 tail), one scalar at a time, same arithmetic per slice.
void ScalarColumns(const Problem& p, int64_t c0, int64_t c1) {
  const int64_t K = p.k, N = p.n, B = p.block, nb = K / B;
  for (int64_t r = 0; r < p.m; ++r)
    for (int64_t c = c0; c < c1; ++c) {
      float total = 0.f;
      for (int64_t s = 0; s < p.num_slices; ++s) {
        float part = 0.f;
        for (int64_t b = s * p.slice_rows / B; b < std::min(K, (s + 1) * p.slice_rows) / B; ++b) {
          int32_t dot = 0;
          for (int64_t kk = b * B; kk < (b + 1) * B; ++kk)
            dot += static_cast<int32_t>(p.qa[r * K + kk]) * static_cast<int32_t>(p.q[kk * N + c]);
          float f = static_cast<float>(dot) * p.sa[r * nb + b];
          if (p.grouped) f *= p.scales[b * N + c];
          part += f;
        }
        if (!p.grouped) part *= p.scales[c];
        total = s == 0 ? part : total + part;
      }
      p.out[r * N + c] = total;
    }
}

struct Job {
  Problem p;
  int64_t vec_cols, col_tiles, row_chunks, num_items;
  int64_t panel, step;  // few rows: columns per panel, weight rows per pass
  bool few;
  std::unique_ptr<float[]> scratch;  // few rows: [num_slices - 1, M, N]

  // Few rows: slice s into out (s = 0) or its scratch rows. Block by block, every column tile in turn, so
  // the block's weight rows are read left to right; fsum holds the slice's float sums, [tile][row][64].
  void Slice(int64_t s, float* fsum, int32_t* isum) {
    const int64_t k0 = s * p.slice_rows, k1 = std::min(p.k, (s + 1) * p.slice_rows);
    float* dst = s == 0 ? p.out : scratch.get() + (s - 1) * p.m * p.n;
    for (int64_t c0 = 0; c0 < vec_cols; c0 += panel) {
      const int64_t c1 = std::min(vec_cols, c0 + panel);
      std::fill(fsum, fsum + p.m * (c1 - c0), 0.f);
      for (int64_t kb = k0; kb < k1; kb += step)
        for (int64_t c = c0; c < c1; c += kTileCols)
          BlockRows<false>(p, 0, p.m, c, kb, kb + step, nullptr, fsum + (c - c0) * p.m, isum + (c - c0) * p.m);
      for (int64_t c = c0; c < c1; c += kTileCols) Emit(p, 0, p.m, c, fsum + (c - c0) * p.m, dst, false);
    }
  }

  // Many rows: one column tile x one row chunk, every slice in order, the tile's weight strip interleaved
  // once per slice into `wt` for all the chunk's rows.
  void Item(int64_t i, float* fsum, __m512i* wt) {
    const int64_t c = (i % col_tiles) * kTileCols, r0 = (i / col_tiles) * kRowChunk;
    const int64_t r1 = std::min(p.m, r0 + kRowChunk);
    for (int64_t s = 0; s < p.num_slices; ++s) {
      const int64_t k0 = s * p.slice_rows, k1 = std::min(p.k, (s + 1) * p.slice_rows);
      for (int64_t kk = k0; kk < k1; kk += 4) {
        // A strip of a wide weight touches a new page every row: prefetch well ahead of the hardware.
        for (int j = 0; j < 4; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(p.q + (kk + kStripPrefetchRows + j) * p.n + c), _MM_HINT_T0);
        Interleave(p.q + kk * p.n + c, p.n, wt + (kk - k0));
      }
      std::fill(fsum, fsum + (r1 - r0) * kTileCols, 0.f);
      for (int64_t r = r0; r < r1; r += 4) {
        const int64_t re = std::min(r1, r + 4);
        for (int64_t kb = k0; kb < k1; kb += p.block)
          BlockRows<true>(p, r, re, c, kb, kb + p.block, wt + (kb - k0), fsum + (r - r0) * kTileCols, nullptr);
      }
      Emit(p, r0, r1 - r0, c, fsum, p.out, s > 0);
    }
  }

  // Work item i on whichever thread takes it (see ParallelFor), with that thread's scratch buffers.
  void Run(int64_t i) {
    thread_local std::unique_ptr<float[]> fsum;
    thread_local int64_t fsum_size = 0;
    thread_local std::unique_ptr<int32_t[]> isum;
    thread_local int64_t isum_size = 0;
    thread_local std::unique_ptr<__m512i[]> wt;
    thread_local int64_t wt_size = 0;
    const int64_t need_f = few ? p.m * panel : kRowChunk * kTileCols, need_w = few ? 0 : p.slice_rows;
    const int64_t need_i = few ? p.m * panel : 0;
    if (need_f > fsum_size) fsum.reset(new float[fsum_size = need_f]);
    if (need_i > isum_size) isum.reset(new int32_t[isum_size = need_i]);
    if (need_w > wt_size) wt.reset(new __m512i[wt_size = need_w]);  // operator new[] honours alignas(64)
    if (few) Slice(i, fsum.get(), isum.get());
    else Item(i, fsum.get(), wt.get());
  }
};

// Quantizes rows [r0, r1) of x [M, K] per block of B inputs (see the header for the formula).
void QuantizeRows(const float* x, int64_t r0, int64_t r1, int64_t k, int64_t block, int8_t* qa, float* sa,
                  int32_t* bias) {
  const int64_t nb = k / block;
  for (int64_t i = r0 * nb; i < r1 * nb; ++i) {
    const float* xb = x + i * block;
    int8_t* qb = qa + i * block;
    float amax = 0.f;
    int32_t sum = 0;
    if (block % 16 == 0) {
      __m512 m = _mm512_setzero_ps();
      for (int64_t j = 0; j < block; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xb + j)));
      amax = _mm512_reduce_max_ps(m);
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m512i total = _mm512_setzero_si512();
      for (int64_t j = 0; j < block; j += 16) {
        // cvtps rounds half to even (the default MXCSR mode), as std::nearbyint and jnp.round do.
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + j), inv));
        v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + j), _mm512_cvtepi32_epi8(v));
        total = _mm512_add_epi32(total, v);
      }
      sum = _mm512_reduce_add_epi32(total);
    } else {
      for (int64_t j = 0; j < block; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t j = 0; j < block; ++j) {
        const float v = std::nearbyint(xb[j] * inv);
        const int32_t qv = static_cast<int32_t>(std::min(127.f, std::max(-127.f, v)));
        qb[j] = static_cast<int8_t>(qv);
        sum += qv;
      }
    }
    sa[i] = amax / 127.f;
    bias[i] = 128 * sum;
  }
}

ffi::Error Int8DotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::S8, 3> q,
                       ffi::Buffer<ffi::F32, 2> scales, ffi::Buffer<ffi::S32, 0> layer, ffi::Buffer<ffi::S32, 0> rows_arg,
                       ffi::ResultBuffer<ffi::F32, 2> out, int64_t block, int64_t grouped) {
  const int64_t num_layers = q.dimensions()[0], k = q.dimensions()[1], n = q.dimensions()[2];
  const int64_t m_all = x.dimensions()[0];
  if (x.dimensions()[1] != k)
    return ffi::Error::InvalidArgument("x has " + std::to_string(x.dimensions()[1]) + " columns, the weight has K=" +
                                       std::to_string(k) + " rows");
  if (block <= 0 || block % 4 || k % block)
    return ffi::Error::InvalidArgument("act_block=" + std::to_string(block) + " must be a multiple of 4 dividing K=" +
                                       std::to_string(k));
  const int64_t per_layer = grouped ? (k / block) * n : n;
  if (scales.dimensions()[0] != num_layers || scales.dimensions()[1] != per_layer)
    return ffi::Error::InvalidArgument("scales must be [L, " + std::to_string(per_layer) + "]");
  if (out->dimensions()[0] != m_all || out->dimensions()[1] != n) return ffi::Error::InvalidArgument("out must be [M, N]");
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= num_layers)
    return ffi::Error::InvalidArgument("layer=" + std::to_string(l) + " must be in [0, " + std::to_string(num_layers) + ")");
  const int64_t m = std::max<int64_t>(0, std::min<int64_t>(*rows_arg.typed_data(), m_all));
  float* o = out->typed_data();
  std::fill(o + m * n, o + m_all * n, 0.f);  // padding rows of a compiled step shape
  if (m == 0 || n == 0) return ffi::Error::Success();

  const int64_t nb = k / block;
  std::unique_ptr<int8_t[]> qa(new int8_t[m * k]);
  std::unique_ptr<float[]> sa(new float[m * nb]);
  std::unique_ptr<int32_t[]> bias(new int32_t[m * nb]);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t quant_rows = 64;  // rows per item: a small M is quantized on the calling thread
  ParallelFor(pool, threads, (m + quant_rows - 1) / quant_rows, [&](int64_t i) {
    QuantizeRows(x.typed_data(), i * quant_rows, std::min(m, (i + 1) * quant_rows), k, block, qa.get(), sa.get(),
                 bias.get());
  });

  Job job;
  Problem& p = job.p;
  p = Problem{qa.get(), sa.get(), bias.get(), q.typed_data() + l * k * n, scales.typed_data() + l * per_layer, o,
              m, k, n, block, grouped != 0, 0, 0, 0};
  // Slices: whole blocks, from the weight's size and the pool only (never from M: batch invariance).
  const int64_t slices = std::max<int64_t>(1, std::min({4 * threads, nb, k * n / kMinBytesPerSlice}));
  p.slice_rows = (nb + slices - 1) / slices * block;
  p.num_slices = (k + p.slice_rows - 1) / p.slice_rows;
  job.vec_cols = n / kTileCols * kTileCols;
  job.col_tiles = job.vec_cols / kTileCols;
  job.few = m <= kFewRows;
  // Few rows: a pass covers `step` weight rows of a panel; the prefetch fetches the same columns one pass ahead.
  job.panel = job.vec_cols <= 2 * kPanelCols ? job.vec_cols : kPanelCols;
  job.step = FewRowsStep(block, job.panel);
  p.prefetch = job.step * n;
  job.row_chunks = (m + kRowChunk - 1) / kRowChunk;
  job.num_items = job.few ? p.num_slices : job.col_tiles * job.row_chunks;
  if (job.vec_cols > 0) {
    if (job.few && p.num_slices > 1) job.scratch.reset(new float[(p.num_slices - 1) * m * n]);
    ParallelFor(pool, threads, job.num_items, [&job](int64_t i) { job.Run(i); });
    if (job.few)
      for (int64_t s = 1; s < p.num_slices; ++s) {
        const float* part = job.scratch.get() + (s - 1) * m * n;
        for (int64_t r = 0; r < m; ++r)
          for (int64_t c = 0; c < job.vec_cols; ++c) o[r * n + c] += part[r * n + c];
      }
  }
  if (job.vec_cols < n) ScalarColumns(p, job.vec_cols, n);
  return ffi::Error::Success();
}

using F32Matrix = ffi::Buffer<ffi::F32, 2>;  // aliases: commas cannot appear in the handler macro
using S8Stack = ffi::Buffer<ffi::S8, 3>;
using S32Scalar = ffi::Buffer<ffi::S32, 0>;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RidgelineInt8Dot, Int8DotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()  // x [M, K]
                                  .Arg<S8Stack>()    // q [L, K, N]
                                  .Arg<F32Matrix>()  // scales [L, N] or [L, K/B * N]
                                  .Arg<S32Scalar>()  // layer
                                  .Arg<S32Scalar>()  // rows: x's real rows (the rest are padding)
                                  .Ret<F32Matrix>()  // out [M, N]
                                  .Attr<int64_t>("act_block")
                                  .Attr<int64_t>("grouped"));
#endif  // __AVX512VNNI__
