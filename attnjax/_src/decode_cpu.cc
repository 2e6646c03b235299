// attnjax: one decoding step on the CPU, as an XLA FFI custom call.
//
// Writes this step's keys and values into the cache buffers (aliased in and out, so a donated
// cache is updated in place, in every storage dtype) and returns the attention of the step's
// queries over the cached positions < P (out normalised, and its log-sum-exp), to be merged by
// the caller with the attention over the step's own tokens. The cache is read once, row by row
// in its BSKH layout (all kv heads of a slot are contiguous), in blocks of up to BLOCK slots
// (about 32 KiB of key rows) that stay in L1/L2 between the score pass and the value pass, with
// bfloat16/float16 values converted in registers, on the XLA:CPU intra-op thread pool.
//
// Built by attnjax/_src/native.py on first use with the host's C++ compiler; the semantics
// are those of attnjax/_src/decode.py's _attend_cache + _write (the pure-JAX path), which this
// kernel replaces only where it applies (see native.py).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t BLOCK = 64;  // cache slots per block (its scores: N·T·BLOCK floats, in L1/L2)
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// exp(r) for |r| <= ln(2) / 2: degree-6 Taylor polynomial (float or a vector of floats).
template <typename F>
inline F exp_poly(F r) {
  F p = F{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

// exp(x) for x <= 0 (what online softmax needs), written so that compilers vectorize it:
// range reduction by ln 2 and a degree-6 polynomial (relative error ~2e-7); 0 below -87.
inline float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(xc * 1.44269504f + 0.5f);
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  const float p = exp_poly(r);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// Storage dtypes, read as float32.
struct F32 {
  using T = float;
  static inline float get(T x) { return x; }
};
struct BF16 {
  using T = uint16_t;
  static inline float get(T x) {
    const uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};
struct F16 {
  using T = uint16_t;  // IEEE binary16 bits (no _Float16: GCC < 12 lacks it on x86)
  static inline float get(T x) {
    const uint32_t sign = static_cast<uint32_t>(x & 0x8000u) << 16;
    const uint32_t em = x & 0x7fffu;  // exponent and mantissa
    uint32_t u;
    if (em >= 0x7c00u) {  // inf, nan
      u = sign | 0x7f800000u | ((em & 0x3ffu) << 13);
    } else if (em >= 0x400u) {  // normal: rebias the exponent by 127 - 15
      u = sign | ((em << 13) + (112u << 23));
    } else {  // zero, subnormal: em * 2^-24, exact in float32
      const float f = static_cast<float>(em) * 5.9604644775390625e-08f;
      std::memcpy(&u, &f, sizeof(u));
      u |= sign;
    }
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};

struct Problem {
  int64_t B, T, N, K, H, Hv, L, G;
  const float* q;        // (B, T, N, H) queries, unscaled
  float scale;           // the kernels multiply the queries (or their scores) by it
  const int32_t* P;      // (B,) cached lengths before the step
  const int32_t* P_end;  // (B,) lengths after the step
  int64_t window_left;   // -1: no window
  bool ring;
  float soft_cap;        // 0: none
  bool q_bf16 = false;   // every query value a bfloat16 number
};

// The positions [lo, hi) a row reads: every cached position < P still in the buffer and
// visible to at least one of the step's queries.
inline void row_range(const Problem& pr, int64_t b, int64_t* lo, int64_t* hi) {
  const int64_t P = pr.P[b];
  int64_t l = 0, h = std::min<int64_t>(P, pr.L);
  if (pr.ring) {
    l = std::max<int64_t>(0, static_cast<int64_t>(pr.P_end[b]) - pr.L);
    h = P;
  }
  if (pr.window_left >= 0) l = std::max<int64_t>(l, P - pr.window_left);
  *lo = l;
  *hi = std::max(l, h);
}

typedef float v8 __attribute__((vector_size(32)));

inline v8 ld8(const float* p) {
  v8 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void st8(float* p, v8 x) { std::memcpy(p, &x, sizeof(x)); }
typedef int32_t v8i __attribute__((vector_size(32)));

// exp_nonpos on eight lanes: the same range reduction and polynomial (n = round(x / ln 2) as
// -trunc(0.5 - x / ln 2), exact for x <= 0, as vector floor is not portable and the build's
// -fassociative-math would fold the 1.5 * 2^23 rounding trick away).
inline v8 exp8_nonpos(v8 x) {
  const v8 lo = v8{} - 87.0f;
  const v8 xc = x < lo ? lo : x;
  const v8i ni = -__builtin_convertvector(0.5f - xc * 1.44269504f, v8i);
  const v8 n = __builtin_convertvector(ni, v8);
  const v8 r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  const v8 p = exp_poly(r);
  const v8i bits = (ni + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? v8{} : p * scale;
}

inline float hsum(v8 a) {
  const float lo = (a[0] + a[4]) + (a[1] + a[5]);
  const float hi = (a[2] + a[6]) + (a[3] + a[7]);
  return lo + hi;
}

// The next block's cache rows (raw bytes: its key rows, then its value rows), prefetched while
// this block is computed, a few lines per unit of work (one slot of one kv head), so that reads
// from memory are in flight all through the arithmetic. Issuing a whole row group at once stalled
// the core until the lines arrived, and then left memory idle while it computed (measured: 15-35 %
// slower when streaming from memory). The lines go to L2, not L1 (prefetcht1): prefetched into
// L1 (the next block's rows are twice its size) they competed with the rows being computed on, for
// L1's capacity or its miss buffers (smaller blocks with L1 prefetches were no faster, so not
// capacity alone). Zen 4, two threads, B=1, N=8, H=64, L=64k, the kernel alone against a
// two-thread read of the same bytes: K=8 float32 1.79/1.63 -> 1.19/1.22, bfloat16 1.87/1.74 ->
// 1.24/1.20; K=2 float32 1.76/1.64 -> 1.27/1.17 (one token, two rounds); in L2 (L=256, one
// thread) K=8 float32 26 -> 21 us. Placing prefetcht1 lines in L2 only is new with Zen 4 (AMD);
// older cores may fill L1 as before.
struct Ahead {
  const char* rows[2 * BLOCK];
  int64_t n = 0;               // rows in the list
  int64_t first_value = 0;     // index of the first value row
  int64_t bytes[2] = {0, 0};   // bytes per key row, per value row
  int64_t quota = 0;           // lines per unit of work
  int64_t row = 0, off = 0;    // the next line to prefetch
  // When each array's rows are consecutive in memory (no wrap of a ring), the same lines in the
  // same order as two ranges, without the per-row bookkeeping: in cache (K=2, T=4, bfloat16, one
  // thread, L=2048) 111 -> 100 us, with the 16-column value pass issuing a unit per step.
  const char* range[2] = {nullptr, nullptr};
  int64_t lines[2] = {0, 0};   // lines per range
  int64_t line = 0;            // the next line, counted over both ranges
  inline void issue(int64_t units) {
    if (range[0]) {
      const int64_t end = std::min(lines[0] + lines[1], line + units * quota);
      for (; line < end && line < lines[0]; ++line) __builtin_prefetch(range[0] + line * 64, 0, 2);
      for (; line < end; ++line) __builtin_prefetch(range[1] + (line - lines[0]) * 64, 0, 2);
      return;
    }
    int64_t c = units * quota;
    while (c > 0 && row < n) {  // a tight loop per row (a per-line cursor cost ~20 % in cache)
      const int64_t rb = bytes[row >= first_value];
      const int64_t end = std::min(rb, off + c * 64);
      const char* p = rows[row];
      c -= (end - off + 63) / 64;
      for (; off < end; off += 64) __builtin_prefetch(p + off, 0, 2);  // prefetcht1: to L2
      if (off >= rb) {
        off = 0;
        ++row;
      }
    }
  }
};

// max(init, x[0], ..., x[C-1]), eight lanes at a time (a float max loop is not vectorized by
// compilers without -ffinite-math-only).
inline float block_max(const float* x, int64_t C, float init) {
  float mx = init;
  int64_t i = 0;
  if (C >= 8) {
    v8 m = ld8(x);
    for (i = 8; i + 8 <= C; i += 8) {
      const v8 b = ld8(x + i);
      m = m > b ? m : b;
    }
    for (int l = 0; l < 8; ++l) mx = std::max(mx, m[l]);
  }
  for (; i < C; ++i) mx = std::max(mx, x[i]);
  return mx;
}

// The generic path (head dims without vector code): s[i] = <q, rows[i] + off> for i < C, and
// a += sum_i p[i] * (rows[i] + off), plain loops over float32 rows.
inline void dots(const float* q, const float* const* rows, int64_t off, int64_t H, int64_t C,
                 float* s) {
  for (int64_t i = 0; i < C; ++i) {
    const float* r = rows[i] + off;
    float d = 0.0f;
    for (int64_t h = 0; h < H; ++h) d += q[h] * r[h];
    s[i] = d;
  }
}

inline void axpys(float* a, const float* p, const float* const* rows, int64_t off, int64_t Hv,
                  int64_t C) {
  for (int64_t i = 0; i < C; ++i) {
    const float* r = rows[i] + off;
    const float pi = p[i];
    for (int64_t h = 0; h < Hv; ++h) a[h] += pi * r[h];
  }
}

// Eight values of a cache row as float32, converted in registers: R is the storage type the
// kernels read (F32, BF16, or F16 where the CPU has F16C; see direct()).
template <typename R>
inline v8 load8(const typename R::T* p) {
  if constexpr (std::is_same_v<R, F32>) {
    return ld8(p);
  } else if constexpr (std::is_same_v<R, BF16>) {
    typedef uint16_t v8h __attribute__((vector_size(16)));
    typedef uint32_t v8u __attribute__((vector_size(32)));
    v8h h;
    std::memcpy(&h, p, sizeof(h));
    const v8u u = __builtin_convertvector(h, v8u) << 16;
    v8 f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else {
#if defined(__F16C__)
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    v8 r;
    std::memcpy(&r, &f, sizeof(r));
    return r;
#else
    static_assert(sizeof(R) == 0, "float16 rows are converted into a buffer without F16C");
    return v8{};
#endif
  }
}

// Logical vector v (eight values) of a row as float32. For float32 and float16 it is values
// 8v .. 8v+7. For bfloat16 one 32-byte load holds values 16g .. 16g+15 (g = v / 2) as pairs in
// 32-bit lanes, so vector 2g is the even values (a shift) and 2g+1 the odd ones (a mask): two
// single-cycle operations per 16 values, no widening. The kernels that use it hold queries and
// value accumulators in the same permuted order (permute16), which leaves dot products unchanged.
template <typename R>
inline v8 row8(const typename R::T* row, int v) {
  if constexpr (std::is_same_v<R, BF16>) {
    typedef uint32_t v8u __attribute__((vector_size(32)));
    v8u u;
    std::memcpy(&u, row + 16 * (v / 2), sizeof(u));
    u = (v % 2 == 0) ? (u << 16) : (u & 0xffff0000u);
    v8 f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    return load8<R>(row + 8 * v);
  }
}

// The order row8<R> gives the values of a row of n (a multiple of 16) values in: in place,
// forward (natural -> row8 order) or back.
template <typename R>
inline void permute16(float* x, int64_t n, bool forward) {
  if constexpr (std::is_same_v<R, BF16>) {
    float tmp[16];
    for (int64_t g = 0; g < n; g += 16) {
      for (int j = 0; j < 8; ++j) {
        if (forward) {
          tmp[j] = x[g + 2 * j];
          tmp[8 + j] = x[g + 2 * j + 1];
        } else {
          tmp[2 * j] = x[g + j];
          tmp[2 * j + 1] = x[g + 8 + j];
        }
      }
      std::memcpy(x + g, tmp, sizeof(tmp));
    }
  }
}

// Whether the kernels read storage type S directly (else block_rows converts into float32).
template <typename S>
constexpr bool direct() {
#if defined(__F16C__)
  return true;
#else
  return !std::is_same_v<S, F16>;
#endif
}

// {hsum(a0), hsum(a1), hsum(a2), hsum(a3)} stored at s[0..3].
inline void hsum4(v8 a0, v8 a1, v8 a2, v8 a3, float* s) {
#if defined(__AVX__)
  __m256 x0, x1, x2, x3;
  std::memcpy(&x0, &a0, 32);
  std::memcpy(&x1, &a1, 32);
  std::memcpy(&x2, &a2, 32);
  std::memcpy(&x3, &a3, 32);
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(x0, x1), _mm256_hadd_ps(x2, x3));
  _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
  s[0] = hsum(a0);
  s[1] = hsum(a1);
  s[2] = hsum(a2);
  s[3] = hsum(a3);
#endif
}

#if defined(__AVX512F__)
// AVX-512 tiles for four query columns per kv head (GT % 4 == 0: grouped-query heads, or
// speculative steps) and 64 values: with 32 vector registers of 16 floats, four columns' queries
// (scores) or accumulators (values) stay in 16 registers over a whole block's rows, so a row is
// loaded once per four columns and the queries/accumulators once per block (the AVX2 tiles below
// reload queries for every key vector and accumulators every four rows). Zen 4 (family 25 model
// 17), two threads, B=1, N=8, K=2, H=64, L=64k, the kernel alone against a two-thread read of the
// same bytes, medians of three alternating rounds: one token 3.04 -> 2.13 (bfloat16), 1.90 ->
// 1.71 (float32); four tokens 5.04 -> 4.25 (bfloat16), 3.0 -> 3.0 (float32). float16 rows too
// (converted 16 values per instruction; they took the AVX2 tiles before): the same harness,
// minimums of three rounds, K=2 one token 1.93 -> 1.46 ms, K=8 four tokens 8.6 -> 7.0 ms.
typedef float v16 __attribute__((vector_size(64)));

inline v16 ld16(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void st16(float* p, v16 x) { std::memcpy(p, &x, sizeof(x)); }
// Halves of a vector of 16 and back (bit casts to the intrinsics' types; through a stack array,
// GCC spilled the accumulators of the loops below).
inline v8 lo8(v16 x) {
  __m512 r;
  std::memcpy(&r, &x, sizeof(r));
  const __m256 h = _mm512_castps512_ps256(r);
  v8 y;
  std::memcpy(&y, &h, sizeof(y));
  return y;
}
inline v8 hi8(v16 x) {
  __m512d r;
  std::memcpy(&r, &x, sizeof(r));
  const __m256d h = _mm512_extractf64x4_pd(r, 1);
  v8 y;
  std::memcpy(&y, &h, sizeof(y));
  return y;
}
inline v16 cat8(v8 lo, v8 hi) {
  __m256d l, h;
  std::memcpy(&l, &lo, sizeof(l));
  std::memcpy(&h, &hi, sizeof(h));
  const __m512d r = _mm512_insertf64x4(_mm512_castpd256_pd512(l), h, 1);
  v16 x;
  std::memcpy(&x, &r, sizeof(x));
  return x;
}

// Values 32c .. 32c + 31 of a row as two vectors of 16: in order for float32 and float16 (16
// values converted per instruction); for bfloat16 (one 64-byte load) the even values, then the
// odd ones.
template <typename R>
inline void row32(const typename R::T* r, v16& a, v16& b) {
  if constexpr (std::is_same_v<R, BF16>) {
    typedef uint32_t v16u __attribute__((vector_size(64)));
    v16u u;
    std::memcpy(&u, r, sizeof(u));
    const v16u e = u << 16, o = u & 0xffff0000u;
    std::memcpy(&a, &e, sizeof(a));
    std::memcpy(&b, &o, sizeof(b));
  } else if constexpr (std::is_same_v<R, F16>) {
    const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r)));
    const __m512 y = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 16)));
    std::memcpy(&a, &x, sizeof(a));
    std::memcpy(&b, &y, sizeof(b));
  } else {
    a = ld16(r);
    b = ld16(r + 16);
  }
}

// Accumulators of values 32c .. 32c + 31 in row32's order, from and to the row8 order they are
// kept in (for bfloat16, row8's even and odd halves of 16 values: a = even values of both halves)
template <typename R>
inline void acc_load32(const float* m, v16& a, v16& b) {
  if constexpr (std::is_same_v<R, BF16>) {
    a = cat8(ld8(m), ld8(m + 16));
    b = cat8(ld8(m + 8), ld8(m + 24));
  } else {
    a = ld16(m);
    b = ld16(m + 16);
  }
}
template <typename R>
inline void acc_store32(float* m, v16 a, v16 b) {
  if constexpr (std::is_same_v<R, BF16>) {
    st8(m, lo8(a));
    st8(m + 16, hi8(a));
    st8(m + 8, lo8(b));
    st8(m + 24, hi8(b));
  } else {
    st16(m, a);
    st16(m + 16, b);
  }
}

// s[c * BLOCK + i] = <q + c * 64, (rows[i] + off)[0 .. 64)> for the four columns c < 4 (head dim
// 64, q in row8 order), the queries in 16 registers over the block's rows, two rows at a time
template <typename R>
inline void scores4x64(const float* q, const typename R::T* const* rows, int64_t off, int64_t C,
                       float* s, Ahead& ahead) {
  v16 q00, q01, q02, q03, q10, q11, q12, q13, q20, q21, q22, q23, q30, q31, q32, q33;
  acc_load32<R>(q, q00, q01);
  acc_load32<R>(q + 32, q02, q03);
  acc_load32<R>(q + 64, q10, q11);
  acc_load32<R>(q + 96, q12, q13);
  acc_load32<R>(q + 128, q20, q21);
  acc_load32<R>(q + 160, q22, q23);
  acc_load32<R>(q + 192, q30, q31);
  acc_load32<R>(q + 224, q32, q33);
  for (int64_t i = 0; i < C; i += 2) {
    const bool two = i + 1 < C;
    ahead.issue(two ? 2 : 1);
    const typename R::T* r0 = rows[i] + off;
    const typename R::T* r1 = two ? rows[i + 1] + off : r0;
    v16 k0, k1, k2, k3, m0, m1, m2, m3;
    row32<R>(r0, k0, k1);
    row32<R>(r0 + 32, k2, k3);
    row32<R>(r1, m0, m1);
    row32<R>(r1 + 32, m2, m3);
    v16 a0 = q00 * k0, a1 = q10 * k0, a2 = q20 * k0, a3 = q30 * k0;
    v16 b0 = q00 * m0, b1 = q10 * m0, b2 = q20 * m0, b3 = q30 * m0;
    a0 += q01 * k1; a1 += q11 * k1; a2 += q21 * k1; a3 += q31 * k1;
    b0 += q01 * m1; b1 += q11 * m1; b2 += q21 * m1; b3 += q31 * m1;
    a0 += q02 * k2; a1 += q12 * k2; a2 += q22 * k2; a3 += q32 * k2;
    b0 += q02 * m2; b1 += q12 * m2; b2 += q22 * m2; b3 += q32 * m2;
    a0 += q03 * k3; a1 += q13 * k3; a2 += q23 * k3; a3 += q33 * k3;
    b0 += q03 * m3; b1 += q13 * m3; b2 += q23 * m3; b3 += q33 * m3;
    float t0[4], t1[4];
    hsum4(lo8(a0) + hi8(a0), lo8(a1) + hi8(a1), lo8(a2) + hi8(a2), lo8(a3) + hi8(a3), t0);
    hsum4(lo8(b0) + hi8(b0), lo8(b1) + hi8(b1), lo8(b2) + hi8(b2), lo8(b3) + hi8(b3), t1);
    for (int c = 0; c < 4; ++c) {
      s[c * BLOCK + i] = t0[c];
      if (two) s[c * BLOCK + i + 1] = t1[c];
    }
  }
}
#endif

// s[y * BLOCK + i] = <q[y], K row i, head y / (T G)> for all columns y = (n, t). Per kv head k
// (columns k*GT .. k*GT + GT - 1, GT = G*T), tiles of 4 columns × 2 slots when GT % 4 == 0,
// else 2 columns × 4 slots (and 1 × 8 for a last single column); each key vector is loaded
// once for the tile's columns, and the tile's sums are reduced four at a time. With AVX-512,
// GT % 4 == 0 and head dim 64 run scores4x64 instead.
template <int HDC, typename R>
inline void scores_block(const float* qt, const typename R::T* const* rows, int64_t K, int64_t GT,
                         int64_t C, float* s, Ahead& ahead, int64_t hd) {
  const int64_t HD = HDC > 0 ? HDC : hd;  // HDC: the head dim, or -1: hd at run time
  const int V = static_cast<int>(HD / 8);
#if defined(__AVX512F__)
  if (GT % 4 == 0 && HD == 64) {  // four columns, the queries in registers over the block
    for (int64_t k = 0; k < K; ++k)
      for (int64_t y = k * GT; y < (k + 1) * GT; y += 4)
        scores4x64<R>(qt + y * HD, rows, k * HD, C, s + y * BLOCK, ahead);
    return;
  }
#endif
  int64_t i = 0;
  if (GT % 4 == 0) {
    // four columns × two slots: each key vector loaded once for four columns, the slots (all
    // their kv heads) in memory order
    for (; i + 2 <= C; i += 2) {
      for (int64_t k = 0; k < K; ++k) {
        ahead.issue(2);
        const typename R::T* r0 = rows[i] + k * HD;
        const typename R::T* r1 = rows[i + 1] + k * HD;
        for (int64_t y = k * GT; y < (k + 1) * GT; y += 4) {
          const float* q0 = qt + y * HD;
          v8 a00{}, a01{}, a10{}, a11{}, a20{}, a21{}, a30{}, a31{};
#pragma GCC unroll 16
          for (int v = 0; v < V; ++v) {
            const v8 k0 = row8<R>(r0, v), k1 = row8<R>(r1, v);
            v8 qv = ld8(q0 + 8 * v);
            a00 += qv * k0;
            a01 += qv * k1;
            qv = ld8(q0 + HD + 8 * v);
            a10 += qv * k0;
            a11 += qv * k1;
            qv = ld8(q0 + 2 * HD + 8 * v);
            a20 += qv * k0;
            a21 += qv * k1;
            qv = ld8(q0 + 3 * HD + 8 * v);
            a30 += qv * k0;
            a31 += qv * k1;
          }
          float t0[4], t1[4];
          hsum4(a00, a10, a20, a30, t0);
          hsum4(a01, a11, a21, a31, t1);
          for (int c = 0; c < 4; ++c) {
            s[(y + c) * BLOCK + i] = t0[c];
            s[(y + c) * BLOCK + i + 1] = t1[c];
          }
        }
      }
    }
  }
  for (; i + 8 <= C; i += 8) {
    for (int64_t k = 0; k < K; ++k) {
      ahead.issue(8);
      const typename R::T* r[8];
      for (int x = 0; x < 8; ++x) r[x] = rows[i + x] + k * HD;
      int64_t y = k * GT;
      const int64_t y_end = y + GT;
      for (; y + 2 <= y_end; y += 2) {
        const float* q0 = qt + y * HD;
        const float* q1 = q0 + HD;
        for (int half = 0; half < 8; half += 4) {
          v8 a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
#pragma GCC unroll 16
          for (int v = 0; v < V; ++v) {
            const v8 qa = ld8(q0 + 8 * v), qb = ld8(q1 + 8 * v);
            v8 kv = row8<R>(r[half], v);
            a0 += qa * kv;
            b0 += qb * kv;
            kv = row8<R>(r[half + 1], v);
            a1 += qa * kv;
            b1 += qb * kv;
            kv = row8<R>(r[half + 2], v);
            a2 += qa * kv;
            b2 += qb * kv;
            kv = row8<R>(r[half + 3], v);
            a3 += qa * kv;
            b3 += qb * kv;
          }
          hsum4(a0, a1, a2, a3, s + y * BLOCK + i + half);
          hsum4(b0, b1, b2, b3, s + (y + 1) * BLOCK + i + half);
        }
      }
      if (y < y_end) {  // one column, eight slots
        const float* q0 = qt + y * HD;
        v8 a[8] = {};
#pragma GCC unroll 16
        for (int v = 0; v < V; ++v) {
          const v8 qa = ld8(q0 + 8 * v);
#pragma GCC unroll 8
          for (int x = 0; x < 8; ++x) a[x] += qa * row8<R>(r[x], v);
        }
        hsum4(a[0], a[1], a[2], a[3], s + y * BLOCK + i);
        hsum4(a[4], a[5], a[6], a[7], s + y * BLOCK + i + 4);
      }
    }
  }
  for (; i < C; ++i)
    for (int64_t k = 0; k < K; ++k, ahead.issue(1))
      for (int64_t y = k * GT; y < (k + 1) * GT; ++y) {
        const float* q0 = qt + y * HD;
        const typename R::T* r = rows[i] + k * HD;
        v8 a{};
        for (int v = 0; v < V; ++v) a += ld8(q0 + 8 * v) * row8<R>(r, v);
        s[y * BLOCK + i] = hsum(a);
      }
}

// a[0 .. 8W) += sum_{i0 <= i < i1} p[i] * (rows[i] + off)[0 .. 8W), the W accumulators in
// registers over the rows.
template <int W, typename R>
inline void axpy_rows(float* a, const float* p, const typename R::T* const* rows, int64_t off,
                      int64_t i0, int64_t i1) {
  v8 av[W];
#pragma GCC unroll 8
  for (int v = 0; v < W; ++v) av[v] = ld8(a + 8 * v);
  for (int64_t i = i0; i < i1; ++i) {
    const typename R::T* r = rows[i] + off;
    const float pi = p[i];
#pragma GCC unroll 8
    for (int v = 0; v < W; ++v) av[v] += pi * row8<R>(r, v);
  }
#pragma GCC unroll 8
  for (int v = 0; v < W; ++v) st8(a + 8 * v, av[v]);
}

#if defined(__AVX512F__)
// acc[c * HD + 0 .. 64) += sum_{i < C} p[c * BLOCK + i] * (rows[i] + off)[0 .. 64) for the four
// columns c < 4 (named accumulators: GCC spilled an array of them to the stack)
template <typename R>
inline void values4x64(float* acc, int64_t HD, const float* p, const typename R::T* const* rows,
                       int64_t off, int64_t C, Ahead& ahead) {
  v16 a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33;
  acc_load32<R>(acc, a00, a01);
  acc_load32<R>(acc + 32, a02, a03);
  acc_load32<R>(acc + HD, a10, a11);
  acc_load32<R>(acc + HD + 32, a12, a13);
  acc_load32<R>(acc + 2 * HD, a20, a21);
  acc_load32<R>(acc + 2 * HD + 32, a22, a23);
  acc_load32<R>(acc + 3 * HD, a30, a31);
  acc_load32<R>(acc + 3 * HD + 32, a32, a33);
  for (int64_t i = 0; i < C; ++i) {
    ahead.issue(1);
    const typename R::T* r = rows[i] + off;
    v16 v0, v1, v2, v3;
    row32<R>(r, v0, v1);
    row32<R>(r + 32, v2, v3);
    const float p0 = p[i], p1 = p[BLOCK + i], p2 = p[2 * BLOCK + i], p3 = p[3 * BLOCK + i];
    a00 += p0 * v0;
    a01 += p0 * v1;
    a02 += p0 * v2;
    a03 += p0 * v3;
    a10 += p1 * v0;
    a11 += p1 * v1;
    a12 += p1 * v2;
    a13 += p1 * v3;
    a20 += p2 * v0;
    a21 += p2 * v1;
    a22 += p2 * v2;
    a23 += p2 * v3;
    a30 += p3 * v0;
    a31 += p3 * v1;
    a32 += p3 * v2;
    a33 += p3 * v3;
  }
  acc_store32<R>(acc, a00, a01);
  acc_store32<R>(acc + 32, a02, a03);
  acc_store32<R>(acc + HD, a10, a11);
  acc_store32<R>(acc + HD + 32, a12, a13);
  acc_store32<R>(acc + 2 * HD, a20, a21);
  acc_store32<R>(acc + 2 * HD + 32, a22, a23);
  acc_store32<R>(acc + 3 * HD, a30, a31);
  acc_store32<R>(acc + 3 * HD + 32, a32, a33);
}
#endif

// acc[y] += sum_i p[y * BLOCK + i] * (V row i, head y / (T G)), in groups of four rows read in
// memory order (all kv heads of a group before the next: measured faster than holding the
// accumulators over the whole block, which reads the block's rows once per 16 values). Per kv
// head, four columns × 16 values at a time (each value vector loaded once for four columns), or
// one column × 64 values (then HD % 64), the accumulators in registers over the group's rows.
// With AVX-512, GT % 4 == 0 and HD % 64 == 0 run values4x64 instead (16 registers of
// accumulators, held over the whole block).
template <int HDC, typename R>
inline void values_block(float* acc, const float* p, const typename R::T* const* rows, int64_t K,
                         int64_t GT, int64_t C, Ahead& ahead, int64_t hd) {
  const int64_t HD = HDC > 0 ? HDC : hd;  // HDC: the head dim, or -1: hd at run time
#if defined(__AVX512F__)
  if (GT % 4 == 0 && HD % 64 == 0) {  // four columns × 64 values at a time, over the block
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < GT; j += 4)
        for (int64_t h0 = 0; h0 < HD; h0 += 64)
          values4x64<R>(acc + (k * GT + j) * HD + h0, HD, p + (k * GT + j) * BLOCK, rows,
                        k * HD + h0, C, ahead);
    return;
  }
#endif
  constexpr int64_t R4 = 4;  // rows per group: read in memory order, every kv head of them
  for (int64_t i0 = 0; i0 < C; i0 += R4) {
    const int64_t i1 = std::min<int64_t>(C, i0 + R4);
    for (int64_t k = 0; k < K; ++k) {
      ahead.issue(i1 - i0);
      int64_t j = 0;
      for (; j + 4 <= GT && HD % 16 == 0; j += 4) {
        const int64_t y = k * GT + j;
        const float* p0 = p + y * BLOCK;
        for (int h0 = 0; h0 < HD; h0 += 16) {
          float* a = acc + y * HD + h0;
          v8 a00 = ld8(a), a01 = ld8(a + 8);
          v8 a10 = ld8(a + HD), a11 = ld8(a + HD + 8);
          v8 a20 = ld8(a + 2 * HD), a21 = ld8(a + 2 * HD + 8);
          v8 a30 = ld8(a + 3 * HD), a31 = ld8(a + 3 * HD + 8);
          for (int64_t i = i0; i < i1; ++i) {
            const typename R::T* r = rows[i] + k * HD + h0;
            const v8 v0 = row8<R>(r, 0), v1 = row8<R>(r, 1);
            const float q0 = p0[i], q1 = p0[BLOCK + i], q2 = p0[2 * BLOCK + i],
                        q3 = p0[3 * BLOCK + i];
            a00 += q0 * v0;
            a01 += q0 * v1;
            a10 += q1 * v0;
            a11 += q1 * v1;
            a20 += q2 * v0;
            a21 += q2 * v1;
            a30 += q3 * v0;
            a31 += q3 * v1;
          }
          st8(a, a00);
          st8(a + 8, a01);
          st8(a + HD, a10);
          st8(a + HD + 8, a11);
          st8(a + 2 * HD, a20);
          st8(a + 2 * HD + 8, a21);
          st8(a + 3 * HD, a30);
          st8(a + 3 * HD + 8, a31);
        }
      }
      for (; j < GT; ++j) {
        const int64_t y = k * GT + j;
        // 64 values at a time, then the rest (HD % 64, a multiple of 16)
        int h0 = 0;
        for (; h0 + 64 <= HD; h0 += 64)
          axpy_rows<8, R>(acc + y * HD + h0, p + y * BLOCK, rows, k * HD + h0, i0, i1);
        float* a = acc + y * HD + h0;
        const float* py = p + y * BLOCK;
        const int64_t off = k * HD + h0;
        if constexpr (HDC > 0) {
          if constexpr (HDC % 64 != 0) axpy_rows<HDC % 64 / 8, R>(a, py, rows, off, i0, i1);
        } else {
          switch (HD % 64) {
            case 16: axpy_rows<2, R>(a, py, rows, off, i0, i1); break;
            case 32: axpy_rows<4, R>(a, py, rows, off, i0, i1); break;
            case 48: axpy_rows<6, R>(a, py, rows, off, i0, i1); break;
            default: break;
          }
        }
      }
    }
  }
}

// The cache slot of position p (a ring buffer keeps position p in slot p % L).
inline int64_t slot_of(const Problem& pr, int64_t p) { return pr.ring ? p % pr.L : p; }

// Plans the prefetch of the `next` positions from p: their key rows (kw values of storage type
// T each), then their value rows (vw values); when the slots are consecutive, as two line ranges
// (see Ahead).
template <typename T>
inline void plan_ahead(const Problem& pr, const T* kc, const T* vc, int64_t b, int64_t p,
                       int64_t next, int64_t kw, int64_t vw, Ahead& ahead) {
  ahead.n = 2 * next;
  ahead.first_value = next;
  ahead.bytes[0] = kw * static_cast<int64_t>(sizeof(T));
  ahead.bytes[1] = vw * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < next; ++i) {
    const int64_t slot = slot_of(pr, p + i);
    ahead.rows[i] = reinterpret_cast<const char*>(kc + (b * pr.L + slot) * kw);
    ahead.rows[next + i] = reinterpret_cast<const char*>(vc + (b * pr.L + slot) * vw);
  }
  if (next > 0 && ahead.rows[next - 1] == ahead.rows[0] + (next - 1) * ahead.bytes[0] &&
      ahead.rows[2 * next - 1] == ahead.rows[next] + (next - 1) * ahead.bytes[1]) {
    for (int a = 0; a < 2; ++a) {  // consecutive slots: each array's lines, first to last
      const uintptr_t first = reinterpret_cast<uintptr_t>(ahead.rows[a * next]);
      const uintptr_t line0 = first & ~uintptr_t{63};
      ahead.range[a] = reinterpret_cast<const char*>(line0);
      ahead.lines[a] = static_cast<int64_t>((first + next * ahead.bytes[a] - line0 + 63) / 64);
    }
  }
}

// Row pointers (storage type R) of the block's C positions pb.. in one cache buffer of `width`
// values per slot: the cache rows themselves when R is the storage type S, else their
// conversion to float32 in `buf`.
template <typename S, typename R>
inline void block_rows(const Problem& pr, const typename S::T* cache, int64_t b, int64_t pb,
                       int64_t C, int64_t width, float* buf, const typename R::T** rows) {
  for (int64_t i = 0; i < C; ++i) {
    const typename S::T* r = cache + (b * pr.L + slot_of(pr, pb + i)) * width;
    if constexpr (std::is_same_v<S, R>) {
      rows[i] = r;
    } else {
      float* dst = buf + i * width;
      int64_t x = 0;
#if defined(__AVX512F__)
      for (; x + 16 <= width; x += 16) {  // 16 values per instruction, exact
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + x));
        if constexpr (std::is_same_v<S, F16>)
          _mm512_storeu_ps(dst + x, _mm512_cvtph_ps(h));
        else
          _mm512_storeu_si512(dst + x, _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
#endif
      for (; x < width; ++x) dst[x] = S::get(r[x]);
      rows[i] = dst;
    }
  }
}

#if defined(__AVX512F__)
// Tiles of 16 query columns of one kv head (G*T a multiple of 16: e.g. 4-token steps with 4
// query heads per kv head), the columns in the lanes of a vector, for float32 caches and for
// bfloat16 caches read by queries that are bfloat16 numbers; other caches (float16, bfloat16
// read by float32 queries) as float32, each block converted 16 values per instruction (K=2, 4
// tokens, L=64k, the kernel alone on two threads: float16 5.9-6.1 -> 3.9-4.1 ms, bfloat16 with
// float32 queries 4.5-5.1 -> 3.8-5.0 ms, against the 4-column tiles).
//
// With 16 columns per kv head a step is bound by arithmetic, not memory: 16 × H multiply-adds
// per cached key and again per value. The other kernels, with a few columns per tile, reduce
// each score across lanes and run the softmax column by column; here no vector is reduced or
// transposed:
// * scores: S[i] (lane c) = sum_d q[c][d] · k[i][d], the queries one vector per d, the key's
//   value broadcast from its row;
// * the online softmax over the block's slots, 16 columns per vector;
// * values: O[c][d .. d+15] += p[c][i] · v[i][d .. d+15], the probability broadcast.
// bfloat16 caches use vdpbf16ps (AVX512-BF16): 32 multiply-adds of bfloat16 pairs per
// instruction where vfmadd231ps does 16, at the same rate on Zen 4 (234 against 116 GFLOP/s per
// core, measured). Scores: the queries' pairs (q[c][2j], q[c][2j+1]) against the key's pair
// (k[i][2j], k[i][2j+1]) broadcast, times the scale. The product of two bfloat16 numbers is
// exact in float32, so with queries that are bfloat16 numbers (Problem::q_bf16, checked per call;
// other queries take the float32 kernels) the scores are the float32 path's up to rounding (the
// order of summation; the scale applied last). Values: (p[c][i], p[c][i+1]) · (v[i][d],
// v[i+1][d]), the two value rows' words interleaved in registers, the probabilities rounded to
// bfloat16 first, as the chunked path and jax.nn.dot_product_attention round them to the values'
// dtype (each weight moves by at most 2^-9 of itself). vdpbf16ps flushes denormal inputs and
// results to zero (below 1.2e-38).
namespace cols16 {

inline __m512 exp16_nonpos(__m512 x) {  // exp_nonpos on 16 lanes (2^n by vscalefps)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  typedef float v16f __attribute__((vector_size(64)));
  v16f rv;
  std::memcpy(&rv, &r, sizeof(rv));
  const v16f pv = exp_poly(rv);
  __m512 p;
  std::memcpy(&p, &pv, sizeof(p));
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  return _mm512_maskz_scalef_ps(live, p, n);  // 0 below -87 (and for -inf)
}

// exp(x) for finite x <= 0 on 16 lanes, for the scores: 2^t with t = x log2(e) rounded, t = n + f
// (|f| <= 1/2), 2^f by a degree-5 polynomial, 2^n by vscalefps (0 for very negative t, no
// compare needed). 9 operations where exp16_nonpos has 12. The polynomial was fitted to 2^f on
// [-1/2, 1/2] (Lawson's iteration on the relative error, 1 at f = 0): relative error 2.4e-7 in
// float32, as exp_poly's. t's rounding adds |x| 2^-24 relative, at most 2.2e-8 of the largest
// probability (1). The rescale factors keep exp16_nonpos (their argument may be -inf).
inline __m512 exp16_fin(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.327647129e-3f), f, _mm512_set1_ps(9.675541893e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713092e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402212024e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 bcast(const uint16_t* p) {  // the bfloat16 pair at p, in every lane
  int32_t u;
  std::memcpy(&u, p, sizeof(u));
  return _mm512_castsi512_ps(_mm512_set1_epi32(u));
}

#if defined(__AVX512BF16__)
inline __m512 dp(__m512 acc, __m512 a, __m512 b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(a), (__m512bh)_mm512_castps_si512(b));
}
#endif

// The order the bfloat16 value pass keeps a column's accumulators in: unpacklo/unpackhi of the
// words of two rows (32 values, four lanes of 128 bits) pair values 8L + w (low) and 8L + 4 + w
// (high), L, w < 4; accumulator j of a group of 32 holds value d_of(j).
inline int64_t d_of(int64_t j) {
  const int64_t g = j / 32, w = j % 32;
  return g * 32 + 8 * ((w % 16) / 4) + 4 * (w / 16) + w % 4;
}

// attend() (below) when (G*T) % 16 == 0, HD % 32 == 0, no window and no soft cap, for caches of
// storage type S read as R: F32 as F32, BF16 as BF16 with pr.q_bf16; other caches (float16,
// bfloat16 read by float32 queries) as F32, each block converted into a buffer.
template <typename S, typename R, int HD>
void attend(const Problem& pr, const typename S::T* kc, const typename S::T* vc, int64_t b,
            int64_t p0, int64_t p1, float* m, float* l, float* acc) {
  static_assert(std::is_same_v<S, R> || std::is_same_v<R, F32>);
  constexpr bool kBF = std::is_same_v<R, BF16>;
  using T = typename R::T;
  constexpr int64_t QW = kBF ? HD / 2 : HD;  // query vectors per tile (pairs for bfloat16)
  const int64_t TT = pr.T, N = pr.N, K = pr.K, GT = pr.G * TT;
  const int64_t NT = N * TT / 16;  // tiles of 16 columns
  // per tile: the queries (QW vectors of 16 lanes), the block's scores, then probabilities
  // (BLOCK vectors), for bfloat16 also their pairs (BLOCK / 2 vectors)
  const int64_t per_tile = 16 * (QW + BLOCK + (kBF ? BLOCK / 2 : 0));
  std::vector<float> buf(NT * per_tile + 16);
  float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) &
                                         ~static_cast<uintptr_t>(63));  // 64-byte aligned
  auto qp = [&](int64_t t) { return base + t * per_tile; };
  auto sc = [&](int64_t t) { return qp(t) + 16 * QW; };
  auto pp = [&](int64_t t) { return sc(t) + 16 * BLOCK; };
  std::vector<float> tmp(HD);
  for (int64_t y = 0; y < N * TT; ++y) {
    const int64_t n = y / TT, t = y % TT, c = y % 16;
    const float* q = pr.q + ((b * TT + t) * N + n) * HD;
    if constexpr (kBF) {
      uint32_t* qt = reinterpret_cast<uint32_t*>(qp(y / 16));
      for (int64_t h = 0; h < HD / 2; ++h) {
        uint32_t lo, hi;
        std::memcpy(&lo, q + 2 * h, 4);
        std::memcpy(&hi, q + 2 * h + 1, 4);
        qt[h * 16 + c] = (lo >> 16) | (hi & 0xffff0000u);  // exact: pr.q_bf16
      }
      float* a = acc + y * HD;  // into the value pass's order
      for (int64_t j = 0; j < HD; ++j) tmp[j] = a[d_of(j)];
      std::memcpy(a, tmp.data(), HD * sizeof(float));
    } else {
      for (int64_t h = 0; h < HD; ++h) qp(y / 16)[h * 16 + c] = q[h] * pr.scale;
    }
  }
  static const uint16_t zero_row[32] = {};  // an odd block's missing last row (32 values read)
  const T* krow[BLOCK];
  const T* vrow[BLOCK];
  std::vector<float> kbuf, vbuf;  // a converted block's rows
  if constexpr (!std::is_same_v<S, R>) {
    kbuf.resize(BLOCK * K * HD);
    vbuf.resize(BLOCK * K * HD);
  }
  const int64_t row_bytes = K * HD * static_cast<int64_t>(sizeof(typename S::T));
  const int64_t blk = std::clamp<int64_t>((32768 / row_bytes) / 8 * 8, 8, BLOCK);
  for (int64_t pb = p0; pb < p1; pb += blk) {
    const int64_t C = std::min<int64_t>(blk, p1 - pb);
    const int64_t CV = kBF ? (C + 1) / 2 : C;  // steps of the value pass: pairs of slots, or slots
    const int64_t next = std::max<int64_t>(0, std::min<int64_t>(blk, p1 - pb - blk));
    Ahead ahead;
    plan_ahead(pr, kc, vc, b, pb + blk, next, K * HD, K * HD, ahead);
    // units of work: a group of 16 slots of a tile (scores), a step of the value pass over a
    // tile's 8 columns × 32 values
    const int64_t units = NT * ((C + 15) / 16) + NT * 2 * (HD / 32) * CV;
    ahead.quota = (2 * next * row_bytes / 64 + units - 1) / units;
    block_rows<S, R>(pr, kc, b, pb, C, K * HD, kbuf.data(), krow);
    block_rows<S, R>(pr, vc, b, pb, C, K * HD, vbuf.data(), vrow);
    // scores S[i] (lane c), 16 slots at a time
    const __m512 sv = _mm512_set1_ps(pr.scale);
    for (int64_t tile = 0; tile < NT; ++tile) {
      const int64_t off = (tile * 16 / GT) * HD;
      const __m512* q = reinterpret_cast<const __m512*>(qp(tile));
      float* s = sc(tile);
      int64_t i0 = 0;
      for (; i0 + 16 <= C; i0 += 16) {
        ahead.issue(1);
        __m512 a[16];
#pragma GCC unroll 16
        for (int x = 0; x < 16; ++x) a[x] = _mm512_setzero_ps();
        if constexpr (kBF) {
#if defined(__AVX512BF16__)
#pragma GCC unroll 4
          for (int64_t h = 0; h < HD / 2; ++h) {
            const __m512 qv = q[h];
#pragma GCC unroll 16
            for (int x = 0; x < 16; ++x) a[x] = dp(a[x], qv, bcast(krow[i0 + x] + off + 2 * h));
          }
#pragma GCC unroll 16
          for (int x = 0; x < 16; ++x) a[x] = _mm512_mul_ps(a[x], sv);
#endif
        } else {
#pragma GCC unroll 4
          for (int64_t h = 0; h < HD; ++h) {
            const __m512 qv = q[h];
#pragma GCC unroll 16
            for (int x = 0; x < 16; ++x)
              a[x] = _mm512_fmadd_ps(qv, _mm512_set1_ps(krow[i0 + x][off + h]), a[x]);
          }
        }
#pragma GCC unroll 16
        for (int x = 0; x < 16; ++x) _mm512_store_ps(s + (i0 + x) * 16, a[x]);
      }
      if (i0 < C) ahead.issue(1);
      for (; i0 < C; ++i0) {
        __m512 a0 = _mm512_setzero_ps();
        if constexpr (kBF) {
#if defined(__AVX512BF16__)
          for (int64_t h = 0; h < HD / 2; ++h) a0 = dp(a0, q[h], bcast(krow[i0] + off + 2 * h));
          a0 = _mm512_mul_ps(a0, sv);
#endif
        } else {
          for (int64_t h = 0; h < HD; ++h)
            a0 = _mm512_fmadd_ps(q[h], _mm512_set1_ps(krow[i0][off + h]), a0);
        }
        _mm512_store_ps(s + i0 * 16, a0);
      }
    }
    for (int64_t tile = 0; tile < NT; ++tile) {
      // online softmax, 16 columns per vector: the probabilities over the scores (float32), or
      // as bfloat16 pairs of slots
      float* s = sc(tile);
      const __m512 m_old = _mm512_loadu_ps(m + tile * 16);
      __m512 mx = m_old;
      for (int64_t i = 0; i < C; ++i) mx = _mm512_max_ps(mx, _mm512_load_ps(s + i * 16));
      const __m512 alpha = exp16_nonpos(_mm512_sub_ps(m_old, mx));  // m_old = -inf: 0
      __m512 sum = _mm512_setzero_ps();
      if constexpr (kBF) {
        const __m512i ilv = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25,
                                             9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2,
                                             17, 1, 16, 0);
        __m512i* ppt = reinterpret_cast<__m512i*>(pp(tile));
        for (int64_t i2 = 0; i2 < CV; ++i2) {
          const __m512 e0 = exp16_fin(_mm512_sub_ps(_mm512_load_ps(s + 2 * i2 * 16), mx));
          const __m512 e1 =
              2 * i2 + 1 < C ? exp16_fin(_mm512_sub_ps(_mm512_load_ps(s + (2 * i2 + 1) * 16), mx))
                             : _mm512_setzero_ps();
          sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
#if defined(__AVX512BF16__)
          const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);  // e0's 16, then e1's
          _mm512_store_si512(ppt + i2, _mm512_permutexvar_epi16(ilv, both));
#endif
        }
      } else {
        for (int64_t i = 0; i < C; ++i) {
          const __m512 e = exp16_fin(_mm512_sub_ps(_mm512_load_ps(s + i * 16), mx));
          sum = _mm512_add_ps(sum, e);
          _mm512_store_ps(s + i * 16, e);
        }
      }
      _mm512_storeu_ps(l + tile * 16, _mm512_fmadd_ps(_mm512_loadu_ps(l + tile * 16), alpha, sum));
      _mm512_storeu_ps(m + tile * 16, mx);
      alignas(64) float al[16];
      _mm512_store_ps(al, alpha);
      for (int64_t c = 0; c < 16; ++c) {
        if (al[c] == 1.0f) continue;
        const __m512 ac = _mm512_set1_ps(al[c]);
        float* o = acc + (tile * 16 + c) * HD;
        for (int64_t j = 0; j < HD; j += 16)
          _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_loadu_ps(o + j), ac));
      }
      // values, 8 columns × 32 values at a time (16 accumulators) over the block: for
      // bfloat16, (p[c][i], p[c][i+1]) · (v[i][d], v[i+1][d]), the two rows' words interleaved
      // in registers
      const int64_t off = (tile * 16 / GT) * HD;
      for (int64_t d0 = 0; d0 < HD; d0 += 32) {
        for (int64_t c0 = 0; c0 < 16; c0 += 8) {
          float* o = acc + (tile * 16 + c0) * HD + d0;
          __m512 a[8][2];
#pragma GCC unroll 8
          for (int x = 0; x < 8; ++x) {
            a[x][0] = _mm512_loadu_ps(o + x * HD);
            a[x][1] = _mm512_loadu_ps(o + x * HD + 16);
          }
          if constexpr (kBF) {
#if defined(__AVX512BF16__)
            const uint16_t* pw = reinterpret_cast<const uint16_t*>(pp(tile));
            for (int64_t i2 = 0; i2 < CV; ++i2) {
              ahead.issue(1);  // spread over the pass (from memory: step / read 2.22 -> 2.01)
              const uint16_t* r1 = 2 * i2 + 1 < C ? vrow[2 * i2 + 1] + off + d0 : zero_row;
              const __m512i v0 = _mm512_loadu_si512(vrow[2 * i2] + off + d0);
              const __m512i v1 = _mm512_loadu_si512(r1);
              const __m512 lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(v0, v1));
              const __m512 hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(v0, v1));
#pragma GCC unroll 8
              for (int x = 0; x < 8; ++x) {
                const __m512 pc = bcast(pw + (i2 * 16 + c0 + x) * 2);
                a[x][0] = dp(a[x][0], lo, pc);
                a[x][1] = dp(a[x][1], hi, pc);
              }
            }
#endif
          } else {
            for (int64_t i = 0; i < C; ++i) {
              ahead.issue(1);
              const __m512 v0 = _mm512_loadu_ps(vrow[i] + off + d0);
              const __m512 v1 = _mm512_loadu_ps(vrow[i] + off + d0 + 16);
#pragma GCC unroll 8
              for (int x = 0; x < 8; ++x) {
                const __m512 pc = _mm512_set1_ps(s[i * 16 + c0 + x]);
                a[x][0] = _mm512_fmadd_ps(v0, pc, a[x][0]);
                a[x][1] = _mm512_fmadd_ps(v1, pc, a[x][1]);
              }
            }
          }
#pragma GCC unroll 8
          for (int x = 0; x < 8; ++x) {
            _mm512_storeu_ps(o + x * HD, a[x][0]);
            _mm512_storeu_ps(o + x * HD + 16, a[x][1]);
          }
        }
      }
    }
  }
  if constexpr (kBF) {
    for (int64_t y = 0; y < N * TT; ++y) {  // back to the natural order
      float* a = acc + y * HD;
      for (int64_t j = 0; j < HD; ++j) tmp[d_of(j)] = a[j];
      std::memcpy(a, tmp.data(), HD * sizeof(float));
    }
  }
}

}  // namespace cols16
#endif

// Online softmax over positions [p0, p1) of row b, for all Y = N*T query columns
// (column y = n*T + t): running max m[y], sum l[y], unnormalised acc[y*Hv + :]. HD: the
// head dim of keys and values when the vector code covers it (32, 64, 80, 96, 128, 256: a
// multiple of 16), -1 when it covers it with the head dim known at run time (any other multiple
// of 16), else 0 (generic path).
template <typename S, int HD>
void attend(const Problem& pr, const typename S::T* kc, const typename S::T* vc, int64_t b,
            int64_t p0, int64_t p1, float* m, float* l, float* acc) {
  const int64_t T = pr.T, N = pr.N, K = pr.K, H = pr.H, Hv = pr.Hv, G = pr.G;
  const int64_t Y = N * T;
#if defined(__AVX512F__)
  // 16 query columns per vector (see cols16)
  if constexpr (HD > 0 && HD % 32 == 0) {
    if ((G * T) % 16 == 0 && pr.window_left < 0 && pr.soft_cap == 0.0f) {
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<S, BF16>) {
        if (pr.q_bf16) {
          cols16::attend<BF16, BF16, HD>(pr, kc, vc, b, p0, p1, m, l, acc);
          return;
        }
      }
#endif
      cols16::attend<S, F32, HD>(pr, kc, vc, b, p0, p1, m, l, acc);
      return;
    }
  }
#endif
  // the storage type the kernels read: the cache's own, or float32 converted block by block
  using R = std::conditional_t<(HD != 0 && direct<S>()), S, F32>;
  std::vector<float> qt(Y * H);  // queries in column order (n, t)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        qt[(n * T + t) * H + h] = pr.q[((b * T + t) * N + n) * H + h] * pr.scale;
  // queries and accumulators in the order the kernels read rows in (see row8)
  for (int64_t y = 0; y < Y; ++y) {
    permute16<R>(&qt[y * H], H, true);
    permute16<R>(acc + y * Hv, Hv, true);
  }
  std::vector<float> s(Y * BLOCK);
  std::vector<float> kbuf, vbuf;
  if constexpr (!std::is_same_v<S, R>) {
    kbuf.resize(BLOCK * K * H);
    vbuf.resize(BLOCK * K * Hv);
  }
  const typename R::T* krow[BLOCK];
  const typename R::T* vrow[BLOCK];
  const int64_t P = pr.P[b];
  // slots per block: a block's key rows (and its value rows) about 32 KiB, L1's size, so the
  // block being read and the next one being prefetched stay in L2 (8..BLOCK, a multiple of 8)
  const int64_t row_bytes = K * std::max(H, Hv) * static_cast<int64_t>(sizeof(typename S::T));
  const int64_t blk = std::clamp<int64_t>((32768 / row_bytes) / 8 * 8, 8, BLOCK);
  for (int64_t pb = p0; pb < p1; pb += blk) {
    const int64_t C = std::min<int64_t>(blk, p1 - pb);
    // the next block's rows, half of their lines prefetched in each pass over this one (C·K
    // units per pass, so a quota rounded up covers every line)
    const int64_t next = std::max<int64_t>(0, std::min<int64_t>(blk, p1 - pb - blk));
    Ahead ahead;
    plan_ahead(pr, kc, vc, b, pb + blk, next, K * H, K * Hv, ahead);
    const int64_t lines = next * (ahead.bytes[0] + ahead.bytes[1]) / 64;
    ahead.quota = (lines + 2 * C * K - 1) / (2 * C * K);
    block_rows<S, R>(pr, kc, b, pb, C, K * H, kbuf.data(), krow);
    // scores (slot-major: the block's rows are read in memory order), masked, and the max
    if constexpr (HD != 0) {
      scores_block<HD, R>(qt.data(), krow, K, G * T, C, s.data(), ahead, H);
    } else {
      for (int64_t y = 0; y < Y; ++y)
        dots(&qt[y * H], krow, (y / T / G) * H, H, C, &s[y * BLOCK]);
    }
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t y = n * T + t;
        float* sy = &s[y * BLOCK];
        if (pr.soft_cap > 0.0f)
          for (int64_t i = 0; i < C; ++i) sy[i] = pr.soft_cap * std::tanh(sy[i] / pr.soft_cap);
        // lowest visible position for the query at P + t
        if (pr.window_left >= 0) {
          const int64_t vis_lo = P + t - pr.window_left;
          for (int64_t i = 0; i < C; ++i) sy[i] = pb + i < vis_lo ? NEG_INF : sy[i];
        }
        const float mx = block_max(sy, C, m[y]);
        if (mx == NEG_INF) {  // nothing visible yet: leave the state as it is
          for (int64_t i = 0; i < C; ++i) sy[i] = 0.0f;
          continue;
        }
        const float alpha = exp_nonpos(m[y] - mx);  // m = -inf: 0
        const v8 vmx = v8{} + mx;
        v8 vsum{};
        int64_t i = 0;
        for (; i + 8 <= C; i += 8) {
          const v8 p = exp8_nonpos(ld8(sy + i) - vmx);
          st8(sy + i, p);
          vsum += p;
        }
        float sum = hsum(vsum);
        for (; i < C; ++i) {
          const float p = exp_nonpos(sy[i] - mx);
          sy[i] = p;
          sum += p;
        }
        l[y] = l[y] * alpha + sum;
        m[y] = mx;
        if (alpha != 1.0f) {
          float* a = acc + y * Hv;
          for (int64_t h = 0; h < Hv; ++h) a[h] *= alpha;
        }
      }
    }
    block_rows<S, R>(pr, vc, b, pb, C, K * Hv, vbuf.data(), vrow);
    if constexpr (HD != 0) {
      values_block<HD, R>(acc, s.data(), vrow, K, G * T, C, ahead, H);
    } else {
      for (int64_t y = 0; y < Y; ++y)
        axpys(acc + y * Hv, &s[y * BLOCK], vrow, (y / T / G) * Hv, Hv, C);
    }
  }
  for (int64_t y = 0; y < Y; ++y) permute16<R>(acc + y * Hv, Hv, false);
}

// Runs fn(0..n-1) on the caller and up to `threads - 1` pool workers. Items are claimed from a
// shared counter, so a worker that starts late (or never) costs nothing; the caller returns
// once every item is done.
void parallel_for(ffi::ThreadPool& pool, int64_t threads, int64_t n,
                  const std::function<void(int64_t)>& fn) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n = 0;
    const std::function<void(int64_t)>* fn = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto sh = std::make_shared<Shared>();
  sh->n = n;
  sh->fn = &fn;
  auto work = [](const std::shared_ptr<Shared>& st) {
    for (;;) {
      const int64_t i = st->next.fetch_add(1);
      if (i >= st->n) return;
      (*st->fn)(i);
      if (st->done.fetch_add(1) + 1 == st->n) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  for (int64_t w = 1; w < std::min(threads, n); ++w) pool.Schedule([sh, work] { work(sh); });
  work(sh);
  std::unique_lock<std::mutex> lock(sh->mu);
  sh->cv.wait(lock, [&] { return sh->done.load() == sh->n; });
}

template <typename S>
ffi::Error run(ffi::ThreadPool& pool, Problem pr, ffi::AnyBuffer k_new, ffi::AnyBuffer v_new,
               const int32_t* idx, ffi::AnyBuffer* k_cache, ffi::AnyBuffer* v_cache, float* out,
               float* lse) {
  using T = typename S::T;
  const int64_t B = pr.B, T_ = pr.T, K = pr.K, H = pr.H, Hv = pr.Hv, L = pr.L;
  T* kc = k_cache->reinterpret_data<T>();
  T* vc = v_cache->reinterpret_data<T>();
  // 1. the step's tokens into their slots (idx outside [0, L): not written)
  const T* kn = k_new.reinterpret_data<T>();
  const T* vn = v_new.reinterpret_data<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t slot = idx[b * T_ + t];
      if (slot < 0 || slot >= L) continue;
      std::memcpy(kc + (b * L + slot) * K * H, kn + (b * T_ + t) * K * H, K * H * sizeof(T));
      std::memcpy(vc + (b * L + slot) * K * Hv, vn + (b * T_ + t) * K * Hv, K * Hv * sizeof(T));
    }
  // 2. the cached positions, split into pieces over rows and position ranges
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t total = 0;
  std::vector<int64_t> lo(B), hi(B);
  for (int64_t b = 0; b < B; ++b) {
    row_range(pr, b, &lo[b], &hi[b]);
    total += hi[b] - lo[b];
  }
  // pieces of at least 1024 positions, about 16 per thread in all: while the last piece runs,
  // the other threads wait, hence small ones (with 4 per thread, ~5 % of a long step's thread
  // time was spent waiting; B=8, L=64k)
  const int64_t piece = std::max<int64_t>(1024, (total + 16 * threads - 1) / (16 * threads));
  struct Piece {
    int64_t b, p0, p1;
  };
  std::vector<Piece> pieces;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = lo[b]; p < hi[b]; p += piece)
      pieces.push_back({b, p, std::min(hi[b], p + piece)});
  const int64_t Y = pr.N * T_;
  const int64_t np = static_cast<int64_t>(pieces.size());
  std::vector<float> m(np * Y, NEG_INF), l(np * Y, 0.0f), acc(np * Y * Hv, 0.0f);
  parallel_for(pool, threads, np, [&](int64_t i) {
    const Piece& pc = pieces[i];
    float* mi = &m[i * Y];
    float* li = &l[i * Y];
    float* ai = &acc[i * Y * Hv];
    // the head dims of common models: 32 (small ones), 64 (GPT-2, Llama 3.2 1B), 80 (Phi-2,
    // Pythia-2.8B, StableLM-3B), 96 (Phi-3), 128 (Llama), 256 (Gemma)
    switch (H == Hv ? H : 0) {
      case 32: attend<S, 32>(pr, kc, vc, pc.b, pc.p0, pc.p1, mi, li, ai); break;
      case 64: attend<S, 64>(pr, kc, vc, pc.b, pc.p0, pc.p1, mi, li, ai); break;
      case 80: attend<S, 80>(pr, kc, vc, pc.b, pc.p0, pc.p1, mi, li, ai); break;
      case 96: attend<S, 96>(pr, kc, vc, pc.b, pc.p0, pc.p1, mi, li, ai); break;
      case 128: attend<S, 128>(pr, kc, vc, pc.b, pc.p0, pc.p1, mi, li, ai); break;
      case 256: attend<S, 256>(pr, kc, vc, pc.b, pc.p0, pc.p1, mi, li, ai); break;
      default:  // other multiples of 16 (48, 112, 160, 192, ...): the same code, H at run time
        if (H == Hv && H % 16 == 0)
          attend<S, -1>(pr, kc, vc, pc.b, pc.p0, pc.p1, mi, li, ai);
        else
          attend<S, 0>(pr, kc, vc, pc.b, pc.p0, pc.p1, mi, li, ai);
    }
  });
  // 3. merge the pieces of each row; write out (B, T, N, Hv) and lse (B, T, N)
  std::vector<float> M(Y), D(Y), A(Y * Hv);
  int64_t i = 0;
  for (int64_t b = 0; b < B; ++b) {
    std::fill(M.begin(), M.end(), NEG_INF);
    std::fill(D.begin(), D.end(), 0.0f);
    std::fill(A.begin(), A.end(), 0.0f);
    for (; i < np && pieces[i].b == b; ++i) {
      for (int64_t y = 0; y < Y; ++y) {
        const float mi = m[i * Y + y];
        if (mi == NEG_INF) continue;
        const float mn = std::max(M[y], mi);
        const float a0 = exp_nonpos(M[y] - mn), a1 = exp_nonpos(mi - mn);
        D[y] = D[y] * a0 + l[i * Y + y] * a1;
        for (int64_t h = 0; h < Hv; ++h)
          A[y * Hv + h] = A[y * Hv + h] * a0 + acc[(i * Y + y) * Hv + h] * a1;
        M[y] = mn;
      }
    }
    for (int64_t n = 0; n < pr.N; ++n)
      for (int64_t t = 0; t < T_; ++t) {
        const int64_t y = n * T_ + t;
        float* o = out + ((b * T_ + t) * pr.N + n) * Hv;
        const bool any = D[y] > 0.0f;
        const float inv = any ? 1.0f / D[y] : 0.0f;
        for (int64_t h = 0; h < Hv; ++h) o[h] = A[y * Hv + h] * inv;
        lse[(b * T_ + t) * pr.N + n] = any ? M[y] + std::log(D[y]) : NEG_INF;
      }
  }
  return ffi::Error::Success();
}

ffi::Error decode_step(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_new,
                       ffi::AnyBuffer v_new, ffi::AnyBuffer k_cache_in, ffi::AnyBuffer v_cache_in,
                       ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::S32> P,
                       ffi::Buffer<ffi::S32> P_end, ffi::Result<ffi::AnyBuffer> k_cache,
                       ffi::Result<ffi::AnyBuffer> v_cache, ffi::Result<ffi::Buffer<ffi::F32>> out,
                       ffi::Result<ffi::Buffer<ffi::F32>> lse, int64_t window_left, int64_t ring,
                       float soft_cap, float scale) {
  const auto qd = q.dimensions();
  const auto kd = k_cache->dimensions();
  const auto vd = v_cache->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("attnjax_decode_cpu: rank-4 operands expected");
  Problem pr;
  pr.B = qd[0];
  pr.T = qd[1];
  pr.N = qd[2];
  pr.H = qd[3];
  pr.L = kd[1];
  pr.K = kd[2];
  pr.Hv = vd[3];
  if (kd[0] != pr.B || kd[3] != pr.H || vd[0] != pr.B || vd[1] != pr.L || vd[2] != pr.K ||
      pr.K < 1 || pr.N % pr.K != 0)
    return ffi::Error::InvalidArgument("attnjax_decode_cpu: operand shapes do not match");
  if (k_cache->untyped_data() != k_cache_in.untyped_data() ||
      v_cache->untyped_data() != v_cache_in.untyped_data())
    return ffi::Error::InvalidArgument("attnjax_decode_cpu: cache buffers must be aliased");
  pr.G = pr.N / pr.K;
  pr.q = q.typed_data();
  pr.q_bf16 = true;
  for (int64_t i = 0; i < static_cast<int64_t>(q.element_count()); ++i) {
    uint32_t u;
    std::memcpy(&u, pr.q + i, sizeof(u));
    if (u & 0xffffu) {
      pr.q_bf16 = false;
      break;
    }
  }
  pr.P = P.typed_data();
  pr.P_end = P_end.typed_data();
  pr.window_left = window_left;
  pr.ring = ring != 0;
  pr.soft_cap = soft_cap;
  pr.scale = scale;
  const auto dt = k_cache->element_type();
  if (v_cache->element_type() != dt || k_new.element_type() != dt || v_new.element_type() != dt)
    return ffi::Error::InvalidArgument("attnjax_decode_cpu: cache and new tokens' dtypes differ");
  ffi::AnyBuffer kcb = *k_cache, vcb = *v_cache;
  switch (dt) {
    case ffi::DataType::F32:
      return run<F32>(pool, pr, k_new, v_new, idx.typed_data(), &kcb, &vcb, out->typed_data(),
                      lse->typed_data());
    case ffi::DataType::BF16:
      return run<BF16>(pool, pr, k_new, v_new, idx.typed_data(), &kcb, &vcb, out->typed_data(),
                       lse->typed_data());
    case ffi::DataType::F16:
      return run<F16>(pool, pr, k_new, v_new, idx.typed_data(), &kcb, &vcb, out->typed_data(),
                      lse->typed_data());
    default:
      return ffi::Error::InvalidArgument("attnjax_decode_cpu: cache dtype must be f32/bf16/f16");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnjaxDecodeCpu, decode_step,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // k_new
                                  .Arg<ffi::AnyBuffer>()         // v_new
                                  .Arg<ffi::AnyBuffer>()         // k_cache (aliased to ret 0)
                                  .Arg<ffi::AnyBuffer>()         // v_cache (aliased to ret 1)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx (B, T)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // P (B,)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // P_end (B,)
                                  .Ret<ffi::AnyBuffer>()         // k_cache
                                  .Ret<ffi::AnyBuffer>()         // v_cache
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out (B, T, N, Hv)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse (B, T, N)
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("ring")
                                  .Attr<float>("soft_cap")
                                  .Attr<float>("scale"));
