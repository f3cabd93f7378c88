// CPU kernels of layer norm and RMS norm with an optional fused residual add: norm_fwd,
// norm_bwd.
//
// The math and conventions are those of fastattn/ops/norm/reference.py (the oracle); this file
// says how they are computed fast. With s = x + residual (rounded to x's dtype) or s = x:
//   layer norm  mean = sum_j s_j / D,  var = sum_j (s_j - mean)^2 / D,  rstd = 1 / sqrt(var + eps)
//               xhat_j = (s_j - mean) rstd,  y_j = xhat_j w_j + b_j
//   RMS norm    rstd = 1 / sqrt(sum_j s_j^2 / D + eps),  xhat_j = s_j rstd,  y_j = xhat_j w_j
// Backward, g_j = dy_j w_j: y depends on s through xhat, and
//   d xhat_j / d s_k = rstd (delta_jk - 1/D - xhat_j xhat_k / D)   (layer norm)
//   d xhat_j / d s_k = rstd (delta_jk - xhat_j xhat_k / D)         (RMS norm: no mean term)
// (d rstd / d s_k = -rstd^3 (s_k - mean) / D = -rstd^2 xhat_k / D; the mean's own term
// sum_k (s_k - mean) = 0 drops out of it). Contracting with g:
//   ds_k = rstd (g_k - mean_j(g_j) - xhat_k mean_j(g_j xhat_j)) [+ dsum_k]
// (RMS: without mean_j(g_j)); dsum is the gradient reaching the returned s directly (the
// residual stream). dweight_j = sum_rows dy_j xhat_j, dbias_j = sum_rows dy_j.
//
// Work split and memory traffic. One row (D elements) is the unit; a row of a few thousand
// elements (16 KB at D = 4096 fp32) stays in L1 / L2 between its passes, so DRAM (or L3) sees
// each input row read once and each output row written once:
//   forward   pass 1  sum_j s_j (RMS: sum_j s_j^2), writing s = x + residual on the way;
//             pass 2  (layer norm only) sum_j d_j and sum_j d_j^2, d_j = s_j - mean estimate;
//             pass 3  y_j.
//             Traffic per element, B = bytes of the dtype: 2B (x, y), 4B with a residual
//             (x, residual, s, y) -- eager x + residual then layer norm moves 5B.
//   backward  pass 1  sum_j g_j and sum_j g_j xhat_j, both in one sweep of dy and s;
//             pass 2  ds_j, and dy_j xhat_j, dy_j added into the row block's dweight / dbias
//             partial rows (2 D acc elements, L1 / L2-resident over the block).
//             Traffic per element: 3B (dy, s, ds), 4B with dsum; plus 2 D acc per row block.
// Rows are software-pipelined: the sweep that writes row r (forward pass 3, backward pass 2)
// also runs pass 1 of row r + 1, so one row's reduction chain (lane sums, their fold, the
// double-precision statistics) overlaps the previous row's output instead of stalling it:
// 1.2-2x faster than one row at a time when the data sits in L2. Every array is still swept in
// address order, which the hardware prefetcher streams.
//
// Accuracy. Row sums run in acc lanes (Vec accumulators) over blocks of kSumBlock elements,
// each block's total folded into double; mean, var and rstd are formed in double and rounded
// to acc once. The variance is the corrected two-pass form (see fwd_rows), exact up to the
// roundings of d^2 for any offset of the row (E[s^2] - mean^2 loses all digits when
// |mean| >> std), and the mean is corrected by the same pass.
//
// Determinism of dweight / dbias: rows are cut into blocks of max(kRowBlock, ceil(N /
// kMaxBlocks)) rows; each block sums its rows in row order into its own partial row
// (n_blocks, D); the partials are then added in block order (in double). The block boundaries
// depend on N only, not on the thread count, so the result is bitwise the same for any number of
// threads. Blocks are the unit of at::parallel_for.
//
// Speed without -march=native: the row loops are written on 64-byte GCC vector types (see
// "explicit 64-byte vectors" below) and the row-range functions are compiled per instruction
// set by FA_ROW_KERNEL (target_clones), as the other kernels. Math is in acc = float32 for
// float32/float16/bfloat16 (float64 for float64).

// See "explicit 64-byte vectors" below.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "ops.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

// Elements summed in acc lanes before the block total is folded into double: 32 terms per lane
// with two Vecs of floats (error ~ a few acc ulp of the block sum); rows up to 1024 are one
// block, i.e. one fold per sum.
constexpr int64_t kSumBlock = 1024;

// A task should carry at least this many elements (~10 us of work) to be worth a thread.
constexpr int64_t kMinElementsPerTask = 32768;

// Row blocks of the dweight / dbias partials (see the header): at least kRowBlock rows, so that
// the partials cost at most 2 D acc elements per 32 rows of dy, and at most kMaxBlocks blocks,
// so that the buffer stays small (2 x 64 x D acc: 96 KB at D = 192 fp32, from the heap, where a
// buffer of one block per 32 rows, e.g. 32 MB for 32K rows of 4096, is freshly mapped and
// page-faulted on every call) while leaving 64 tasks to spread over the threads.
constexpr int64_t kRowBlock = 32;
constexpr int64_t kMaxBlocks = 64;

template <typename scalar_t>
using acc_of = typename Elem<scalar_t>::acc;
template <typename scalar_t>
using raw_of = typename Elem<scalar_t>::raw;

template <typename T>
struct Pair {
  T first, second;
};

// ---- explicit 64-byte vectors --------------------------------------------------------------
// The loops here are written on GCC vector-extension types, not left to the auto-vectoriser
// over kLanes-wide scalar arrays as in cross_entropy.cpp: for these short rows GCC kept such
// lane arrays on the stack (a store-forwarding round trip per add) and reduced them lane by
// lane, a fixed ~150 cycles per row that made a 192-wide row cost as much as 600 elements.
// A Vec is 64 bytes (16 floats / 8 doubles): one zmm register in the AVX-512 clone, two ymm in
// the AVX2 clone, four xmm in the baseline build; the compiler splits the operations per
// FA_ROW_KERNEL clone.
// Every function taking or returning a Vec is inlined into its FA_ROW_KERNEL caller, so GCC's
// note that passing 64-byte vectors without AVX-512 changes the calling convention (-Wpsabi,
// emitted for the baseline clone) concerns no call that exists: it is silenced at the top of
// the file.
// Row bodies are lambdas; like the FA_INLINE helpers they must be inlined into the cloned row
// function, or they would be compiled once for the baseline target (and, in the float16 /
// bfloat16 kernels, GCC's heuristics left some of them out of line).
#if defined(__GNUC__)
#define FA_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FA_LAMBDA_INLINE
#endif

template <typename acc_t>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename acc_t>
using Vec = typename VecOf<acc_t>::type;
template <typename acc_t>
constexpr int64_t kWidth = 64 / sizeof(acc_t);  // lanes of a Vec

// The row loops call their body with a tag As<V>: V = Vec<acc> covers elements j .. j+W-1,
// V = acc the single element j of a row's tail; the body's arithmetic is the same code for both.
template <typename V>
struct As {
  using type = V;
};

// ---- float16 / bfloat16 <-> float32 on 16 lanes at once ----------------------------------------
// The formulas of simd.h (half_bits_to_float, float_to_half_bits, bf16_bits_to_float,
// float_to_bf16_bits) written on vectors, lane for lane the same integer and float operations,
// so bit-exact with them (a row's tail elements go through the scalar ones). Called lane by lane
// from a 16-element loop instead, GCC did not vectorise them (the NaN select of the bfloat16
// rounding became a branch per element): bfloat16 rows ran 5x slower than float32 ones.
// float16 stays the slow dtype: ~15 vector integer operations per 16 elements and direction,
// where F16C's vcvtph2ps / vcvtps2ph (which the baseline clone cannot use) would take one.
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
using F32x16 = Vec<float>;

FA_INLINE U32x16 splat_u32(uint32_t v) { return U32x16{} + v; }

// simd.h's bit_cast for vectors, taking its argument by reference (a 64-byte vector passed by
// value draws GCC's ABI note even where the call is inlined).
template <typename To, typename From>
FA_INLINE To vec_bits(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "vec_bits between types of different size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

FA_INLINE F32x16 bf16_to_float16x(const U16x16& h) {
  return vec_bits<F32x16>(__builtin_convertvector(h, U32x16) << 16);
}

FA_INLINE U16x16 float_to_bf16_16x(const F32x16& f) {
  const U32x16 bits = vec_bits<U32x16>(f);
  const U32x16 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const U32x16 quiet_nan = (bits >> 16) | 0x40u;
  return __builtin_convertvector(f != f ? quiet_nan : rounded, U16x16);
}

FA_INLINE F32x16 half_to_float16x(const U16x16& h16) {
  const U32x16 h = __builtin_convertvector(h16, U32x16);
  const U32x16 sign = (h & 0x8000u) << 16;
  const U32x16 expo = (h >> 10) & 0x1fu;
  const U32x16 mant = h & 0x3ffu;
  const U32x16 normal = sign | ((expo + 112u) << 23) | (mant << 13);
  const U32x16 inf_nan = sign | 0x7f800000u | (mant << 13);
  const U32x16 subnormal =
      sign | vec_bits<U32x16>(__builtin_convertvector(mant, F32x16) * 0x1p-24f);
  return vec_bits<F32x16>(expo == 0u ? subnormal : (expo == 31u ? inf_nan : normal));
}

FA_INLINE U16x16 float_to_half16x(const F32x16& f) {
  const U32x16 bits = vec_bits<U32x16>(f);
  const U32x16 sign = (bits >> 16) & 0x8000u;
  const U32x16 mag = bits & 0x7fffffffu;
  const U32x16 huge = mag > 0x7f800000u ? splat_u32(0x7e00u) : splat_u32(0x7c00u);
  const U32x16 subnormal =
      vec_bits<U32x16>(vec_bits<F32x16>(mag) + 0.5f) - 0x3f000000u;
  const U32x16 normal = (mag - (112u << 23) + 0xfffu + ((mag >> 13) & 1u)) >> 13;
  const U32x16 out = mag >= 0x477ff000u ? huge : (mag < 0x38800000u ? subnormal : normal);
  return __builtin_convertvector(out | sign, U16x16);
}

// V = acc: element p[0]; V = Vec<acc>: elements p[0 .. W-1].
template <typename scalar_t, typename V>
FA_INLINE V load(const raw_of<scalar_t>* p) {
  using acc = acc_of<scalar_t>;
  if constexpr (std::is_same_v<V, acc>) {
    return Elem<scalar_t>::load(*p);
  } else if constexpr (std::is_same_v<raw_of<scalar_t>, acc>) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else {
    U16x16 h;
    std::memcpy(&h, p, sizeof h);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return bf16_to_float16x(h);
    } else {
      return half_to_float16x(h);
    }
  }
}

template <typename scalar_t, typename V>
FA_INLINE void store(raw_of<scalar_t>* p, const V& v) {
  using acc = acc_of<scalar_t>;
  if constexpr (std::is_same_v<V, acc>) {
    *p = Elem<scalar_t>::store(v);
  } else if constexpr (std::is_same_v<raw_of<scalar_t>, acc>) {
    std::memcpy(p, &v, sizeof v);
  } else {
    U16x16 h;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      h = float_to_bf16_16x(v);
    } else {
      h = float_to_half16x(v);
    }
    std::memcpy(p, &h, sizeof h);
  }
}

// t[l] += t[l + kHalf] for l < kHalf, then the same on the lower half: a pairwise sum of the
// lanes in log2(W) steps, written with constant trip counts so that it unrolls into shuffles.
template <typename acc_t, int64_t kHalf>
FA_INLINE void fold_lanes(acc_t* t) {
  for (int64_t l = 0; l < kHalf; ++l) t[l] += t[l + kHalf];
  if constexpr (kHalf > 1) fold_lanes<acc_t, kHalf / 2>(t);
}

template <typename acc_t>
FA_INLINE acc_t hsum(const Vec<acc_t>& v) {
  acc_t t[kWidth<acc_t>];
  std::memcpy(t, &v, sizeof v);
  fold_lanes<acc_t, kWidth<acc_t> / 2>(t);
  return t[0];
}

// body(As<V>{}, j) over j in [0, n): whole Vecs, then the tail one element at a time.
template <typename acc_t, typename Body>
FA_INLINE void row_for(int64_t n, const Body& body) {
  constexpr int64_t W = kWidth<acc_t>;
  int64_t j = 0;
  for (; j + W <= n; j += W) body(As<Vec<acc_t>>{}, j);
  for (; j < n; ++j) body(As<acc_t>{}, j);
}

// sum_{j < n} term(As<V>{}, j). Two Vec accumulators (32 float lanes), so that the 4-cycle
// latency of a vector add does not bound the sum of an L1-resident row.
template <typename acc_t, typename Term>
FA_INLINE double row_sum(int64_t n, const Term& term) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kWidth<acc_t>;
  double total = 0;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t end = std::min(n, b + kSumBlock);
    V s0 = {}, s1 = {};
    int64_t j = b;
    for (; j + 2 * W <= end; j += 2 * W) {
      s0 += term(As<V>{}, j);
      s1 += term(As<V>{}, j + W);
    }
    if (j + W <= end) {
      s0 += term(As<V>{}, j);
      j += W;
    }
    acc_t tail = 0;
    for (; j < end; ++j) tail += term(As<acc_t>{}, j);
    total += static_cast<double>(hsum<acc_t>(s0 + s1) + tail);
  }
  return total;
}

// (sum_j term(j).first, sum_j term(j).second) in one pass.
template <typename acc_t, typename Term>
FA_INLINE Pair<double> row_sum2(int64_t n, const Term& term) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kWidth<acc_t>;
  Pair<double> total{0, 0};
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t end = std::min(n, b + kSumBlock);
    V s0 = {}, s1 = {}, d0 = {}, d1 = {};
    int64_t j = b;
    for (; j + 2 * W <= end; j += 2 * W) {
      const Pair<V> v0 = term(As<V>{}, j);
      const Pair<V> v1 = term(As<V>{}, j + W);
      s0 += v0.first;
      d0 += v0.second;
      s1 += v1.first;
      d1 += v1.second;
    }
    if (j + W <= end) {
      const Pair<V> v0 = term(As<V>{}, j);
      s0 += v0.first;
      d0 += v0.second;
      j += W;
    }
    acc_t ts = 0, td = 0;
    for (; j < end; ++j) {
      const Pair<acc_t> v = term(As<acc_t>{}, j);
      ts += v.first;
      td += v.second;
    }
    total.first += static_cast<double>(hsum<acc_t>(s0 + s1) + ts);
    total.second += static_cast<double>(hsum<acc_t>(d0 + d1) + td);
  }
  return total;
}

// ---- norm_fwd ------------------------------------------------------------------------------

template <typename scalar_t>
struct FwdArgs {
  using raw = raw_of<scalar_t>;
  using acc = acc_of<scalar_t>;
  const raw* x;
  const raw* residual;  // nullptr: s = x
  const acc* weight;    // D values; all ones when none was given
  const acc* bias;      // D values; all zeros when none was given (always for RMS)
  raw* y;
  raw* s;     // nullptr without a residual
  acc* mean;  // nullptr for RMS
  acc* rstd;
  int64_t D;
  double eps;
};

// Rows [begin, end): the passes of the header, software-pipelined: the sweep that writes y of
// row r also forms pass 1 of row r + 1, so that row r + 1's reduction chain overlaps row r's
// output (one row at a time, a row's output waited on its own sums, ~100 cycles a row), and
// every array is still swept in address order, which the hardware prefetcher streams.
// float16 / bfloat16 rows are converted to acc once, in pass 1, into a scratch row (two,
// alternating with the pipeline) that passes 2 and 3 read: each element is converted once in
// and once out. float32 / float64 rows are read in place. Without a given weight / bias the
// loops read a row of ones / zeros: * 1 and + 0 are exact, and a few KB of L1 reads cost less
// than four copies of the loops.
template <typename scalar_t, bool kRes, bool kRms>
FA_INLINE void fwd_rows(const FwdArgs<scalar_t>& a, int64_t begin, int64_t end,
                        acc_of<scalar_t>* scratch) {
  using raw = raw_of<scalar_t>;
  using acc = acc_of<scalar_t>;
  constexpr bool kConv = !std::is_same_v<raw, acc>;
  const int64_t D = a.D;
  const double inv_d = 1.0 / static_cast<double>(D);
  const acc* FA_RESTRICT w = a.weight;
  const acc* FA_RESTRICT b = a.bias;
  struct Row {
    const raw* x;
    const raw* res;
    raw* s_out;
    raw* y;
    acc* sc;        // scratch row that pass 1 fills with s in acc (kConv)
    const acc* sa;  // s in acc for passes 2 and 3: sc, or the s row itself
  };
  const auto row = [&](int64_t r) FA_LAMBDA_INLINE {
    const raw* x = a.x + r * D;
    raw* s_out = kRes ? a.s + r * D : nullptr;
    acc* sc = kConv ? scratch + ((r - begin) & 1) * D : nullptr;
    const acc* sa;
    if constexpr (kConv) {
      sa = sc;
    } else {
      sa = kRes ? s_out : x;
    }
    return Row{x, kRes ? a.residual + r * D : nullptr, s_out, a.y + r * D, sc, sa};
  };
  // Pass 1 term: s_j (RMS: s_j^2). With a residual, s = x + residual in acc is stored in x's
  // dtype and the statistics use that rounded s (float16 / bfloat16: read back, a 32-byte
  // reload forwarded from the store; float32 / float64 store it unchanged).
  const auto pass1 = [&](auto as, const Row& q, int64_t j) FA_LAMBDA_INLINE {
    using T = typename decltype(as)::type;
    T v;
    if constexpr (kRes) {
      v = load<scalar_t, T>(q.x + j) + load<scalar_t, T>(q.res + j);
      store<scalar_t>(q.s_out + j, v);
      if constexpr (kConv) v = load<scalar_t, T>(q.s_out + j);
    } else {
      v = load<scalar_t, T>(q.x + j);
    }
    if constexpr (kConv) store<acc>(q.sc + j, v);
    if constexpr (kRms) {
      return v * v;
    } else {
      return v;
    }
  };
  // Pass 3 at j: y_j = (s_j - mean) rstd w_j + b_j (RMS: mean = 0, and s - 0 is exact)
  const auto write = [&](auto as, const Row& q, int64_t j, acc m, acc rs) FA_LAMBDA_INLINE {
    using T = typename decltype(as)::type;
    const T xhat = (load<acc, T>(q.sa + j) - m) * rs;
    store<scalar_t>(q.y + j, xhat * load<acc, T>(w + j) + load<acc, T>(b + j));
  };

  Row cur = row(begin);
  double sum1 = row_sum<acc>(
      D, [&](auto as, int64_t j) FA_LAMBDA_INLINE { return pass1(as, cur, j); });
  for (int64_t r = begin; r < end; ++r) {
    const Row q = cur;
    acc m = 0;
    double var;
    if constexpr (kRms) {
      var = sum1 * inv_d;  // the mean square
    } else {
      // Pass 2 (L1-resident): deviations d = s - m0 from the first estimate m0, then
      //   mean = m0 + sum_j d_j / D,   var = (sum_j d_j^2 - (sum_j d_j)^2 / D) / D,
      // the corrected two-pass form: the correction removes the error of m0 (the acc lane sums
      // of pass 1 carry ~1e-7 of sum_j |s_j|, a visible error when |mean| >> std), and the
      // d_j are small and exact (Sterbenz) wherever s_j is within 2x of m0.
      const acc m0 = static_cast<acc>(sum1 * inv_d);
      const Pair<double> dev = row_sum2<acc>(D, [&](auto as, int64_t j) FA_LAMBDA_INLINE {
        using T = typename decltype(as)::type;
        const T d = load<acc, T>(q.sa + j) - m0;
        return Pair<T>{d, d * d};
      });
      m = static_cast<acc>(static_cast<double>(m0) + dev.first * inv_d);
      var = (dev.second - dev.first * dev.first * inv_d) * inv_d;
      var = var < 0.0 ? 0.0 : var;  // (NaN stays NaN)
      a.mean[r] = m;
    }
    // A variance past the acc type's range (|s - mean| beyond ~1.8e19 in fp32) would give
    // rstd = 0 and a row of plausible zeros: NaN instead, as F.layer_norm gives. (RMS norm's
    // zeros there are F.rms_norm's too.)
    const acc rs = !kRms && std::isinf(var) ? std::numeric_limits<acc>::quiet_NaN()
                                             : static_cast<acc>(1.0 / std::sqrt(var + a.eps));
    a.rstd[r] = rs;
    if (r + 1 < end) {
      cur = row(r + 1);
      sum1 = row_sum<acc>(D, [&](auto as, int64_t j) FA_LAMBDA_INLINE {
        write(as, q, j, m, rs);
        return pass1(as, cur, j);
      });
    } else {
      row_for<acc>(D, [&](auto as, int64_t j) FA_LAMBDA_INLINE { write(as, q, j, m, rs); });
    }
  }
}

// scratch: 2 D acc elements (float16 / bfloat16; unused otherwise).
template <typename scalar_t>
FA_ROW_KERNEL void norm_fwd_rows(const FwdArgs<scalar_t>& a, int64_t begin, int64_t end,
                                 acc_of<scalar_t>* scratch) {
  const bool res = a.residual != nullptr, rms = a.mean == nullptr;
  if (res && rms) fwd_rows<scalar_t, true, true>(a, begin, end, scratch);
  else if (res) fwd_rows<scalar_t, true, false>(a, begin, end, scratch);
  else if (rms) fwd_rows<scalar_t, false, true>(a, begin, end, scratch);
  else fwd_rows<scalar_t, false, false>(a, begin, end, scratch);
}

// ---- norm_bwd ------------------------------------------------------------------------------

template <typename scalar_t>
struct BwdArgs {
  using raw = raw_of<scalar_t>;
  using acc = acc_of<scalar_t>;
  const raw* dy;
  const raw* dsum;    // nullptr: none
  const raw* s;
  const acc* weight;  // D values; all ones when none was given
  const acc* mean;    // nullptr for RMS
  const acc* rstd;
  raw* ds;
  acc* dw_part;  // (n_blocks, D) partials, or nullptr when dweight is not wanted
  acc* db_part;  // same for dbias
  int64_t N, D;
  int64_t rows_per_block;
};

// One row block: for each row, pass 1 (sum_j g_j, sum_j g_j xhat_j), then pass 2 (ds, and
// dy xhat / dy added into the block partials), software-pipelined as in the forward: the sweep
// that writes row r also forms the sums of row r + 1. Every array is swept in address order
// (interleaving 4 rows column by column, to load each weight and partial element once per 4
// rows, ran 2x slower out of L3: 8 short streams that the prefetcher did not follow), and a
// partial element is stored once per row sweep, so the next row's load of it comes a whole
// sweep later (loading it right back stalls store-to-load forwarding of 64-byte vectors).
// float16 / bfloat16: pass 1 keeps dy and s converted to acc in scratch rows for pass 2.
template <typename scalar_t, bool kDsum, bool kDw, bool kDb>
FA_INLINE void bwd_block(const BwdArgs<scalar_t>& a, int64_t blk, acc_of<scalar_t>* scratch) {
  using raw = raw_of<scalar_t>;
  using acc = acc_of<scalar_t>;
  constexpr bool kConv = !std::is_same_v<raw, acc>;
  const int64_t D = a.D;
  const double inv_d = 1.0 / static_cast<double>(D);
  const acc* FA_RESTRICT w = a.weight;
  acc* FA_RESTRICT dwp = kDw ? a.dw_part + blk * D : nullptr;
  acc* FA_RESTRICT dbp = kDb ? a.db_part + blk * D : nullptr;
  if (kDw) std::fill(dwp, dwp + D, acc(0));
  if (kDb) std::fill(dbp, dbp + D, acc(0));
  const int64_t row_begin = blk * a.rows_per_block;
  const int64_t row_end = std::min(a.N, row_begin + a.rows_per_block);

  // Row r's pointers and statistics, read once (a store to ds or a partial could alias a float
  // statistic as far as the compiler knows, which would reload it in every iteration).
  struct Row {
    const raw* dy;
    const raw* s;
    const raw* dsum;
    raw* ds;
    acc* dyc;  // scratch rows that pass 1 fills with dy and s in acc (kConv)
    acc* sc;
    const acc* dya;  // dy and s in acc for pass 2: the scratch rows, or dy and s themselves
    const acc* sa;
    acc m, rs;
  };
  const auto row = [&](int64_t r) FA_LAMBDA_INLINE {
    Row q;
    q.dy = a.dy + r * D;
    q.s = a.s + r * D;
    q.dsum = kDsum ? a.dsum + r * D : nullptr;
    q.ds = a.ds + r * D;
    q.dyc = kConv ? scratch + ((r - row_begin) & 1) * 2 * D : nullptr;
    q.sc = kConv ? q.dyc + D : nullptr;
    if constexpr (kConv) {
      q.dya = q.dyc;
      q.sa = q.sc;
    } else {
      q.dya = q.dy;
      q.sa = q.s;
    }
    q.m = a.mean != nullptr ? a.mean[r] : acc(0);
    q.rs = a.rstd[r];
    return q;
  };
  // Pass 1 term: (g_j, g_j xhat_j)
  const auto sums_term = [&](auto as, const Row& q, int64_t j) FA_LAMBDA_INLINE {
    using T = typename decltype(as)::type;
    const T d = load<scalar_t, T>(q.dy + j);
    const T s = load<scalar_t, T>(q.s + j);
    if constexpr (kConv) {
      store<acc>(q.dyc + j, d);
      store<acc>(q.sc + j, s);
    }
    const T g = d * load<acc, T>(w + j);
    return Pair<T>{g, g * ((s - q.m) * q.rs)};
  };
  // Pass 2 at j, given the row's (mean_j g_j, mean_j g_j xhat_j)
  const auto write = [&](auto as, const Row& q, int64_t j, acc mg, acc mgx) FA_LAMBDA_INLINE {
    using T = typename decltype(as)::type;
    const T xhat = (load<acc, T>(q.sa + j) - q.m) * q.rs;
    const T d = load<acc, T>(q.dya + j);
    T v = q.rs * ((d * load<acc, T>(w + j) - mg) - xhat * mgx);
    if constexpr (kDsum) v += load<scalar_t, T>(q.dsum + j);
    store<scalar_t>(q.ds + j, v);
    if constexpr (kDw) store<acc>(dwp + j, load<acc, T>(dwp + j) + d * xhat);
    if constexpr (kDb) store<acc>(dbp + j, load<acc, T>(dbp + j) + d);
  };

  Row cur = row(row_begin);
  Pair<double> sums = row_sum2<acc>(
      D, [&](auto as, int64_t j) FA_LAMBDA_INLINE { return sums_term(as, cur, j); });
  for (int64_t r = row_begin; r < row_end; ++r) {
    const acc mg = a.mean != nullptr ? static_cast<acc>(sums.first * inv_d) : acc(0);
    const acc mgx = static_cast<acc>(sums.second * inv_d);
    const Row q = cur;
    if (r + 1 < row_end) {
      cur = row(r + 1);
      sums = row_sum2<acc>(D, [&](auto as, int64_t j) FA_LAMBDA_INLINE {
        write(as, q, j, mg, mgx);
        return sums_term(as, cur, j);
      });
    } else {
      row_for<acc>(D, [&](auto as, int64_t j) FA_LAMBDA_INLINE { write(as, q, j, mg, mgx); });
    }
  }
}

// Row blocks [block_begin, block_end), each on its own (see the header). scratch: 4 D acc
// elements (float16 / bfloat16; unused otherwise).
template <typename scalar_t>
FA_ROW_KERNEL void norm_bwd_blocks(const BwdArgs<scalar_t>& a, int64_t block_begin,
                                   int64_t block_end, acc_of<scalar_t>* scratch) {
  const bool dsum = a.dsum != nullptr, dw = a.dw_part != nullptr, db = a.db_part != nullptr;
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    if (dsum) {
      if (dw && db) bwd_block<scalar_t, true, true, true>(a, blk, scratch);
      else if (dw) bwd_block<scalar_t, true, true, false>(a, blk, scratch);
      else if (db) bwd_block<scalar_t, true, false, true>(a, blk, scratch);
      else bwd_block<scalar_t, true, false, false>(a, blk, scratch);
    } else {
      if (dw && db) bwd_block<scalar_t, false, true, true>(a, blk, scratch);
      else if (dw) bwd_block<scalar_t, false, true, false>(a, blk, scratch);
      else if (db) bwd_block<scalar_t, false, false, true>(a, blk, scratch);
      else bwd_block<scalar_t, false, false, false>(a, blk, scratch);
    }
  }
}

// out_j = sum_b part[b, j] over the n_blocks partial rows, in block order, in double; columns
// [c0, c1). Deterministic for any split of the columns.
template <typename acc_t>
FA_ROW_KERNEL void sum_partials(const acc_t* FA_RESTRICT part, int64_t n_blocks, int64_t D,
                                int64_t c0, int64_t c1, acc_t* FA_RESTRICT out,
                                double* FA_RESTRICT tot) {
  const int64_t n = c1 - c0;
  for (int64_t j = 0; j < n; ++j) tot[j] = 0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const acc_t* FA_RESTRICT p = part + b * D + c0;
    for (int64_t j = 0; j < n; ++j) tot[j] += static_cast<double>(p[j]);
  }
  for (int64_t j = 0; j < n; ++j) out[c0 + j] = static_cast<acc_t>(tot[j]);
}

template <typename acc_t>
void reduce_partials(const acc_t* p, int64_t n_blocks, int64_t D, acc_t* o) {
  // Columns in chunks of 512 (4 KB of double totals, L1-resident while the partials stream).
  constexpr int64_t kCols = 512;
  const int64_t n_chunks = (D + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / (n_blocks * kCols));
  at::parallel_for(0, n_chunks, grain, [&](int64_t lo, int64_t hi) {
    std::vector<double> tot(kCols);
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t c1 = std::min(D, (c + 1) * kCols);
      sum_partials<acc_t>(p, n_blocks, D, c * kCols, c1, o, tot.data());
    }
  });
}

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename scalar_t>
raw_of<scalar_t>* raw_ptr(const at::Tensor& t) {
  return reinterpret_cast<raw_of<scalar_t>*>(t.data_ptr<scalar_t>());
}

// The given (D,) vector's data, or a row of `fill` in `storage`.
template <typename acc_t>
const acc_t* vector_or(const std::optional<at::Tensor>& t, std::vector<acc_t>& storage,
                       int64_t D, acc_t fill) {
  if (t.has_value()) return t->data_ptr<acc_t>();
  storage.assign(D, fill);
  return storage.data();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms) {
  const int64_t N = x.size(0);
  const int64_t D = x.size(1);
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor y = at::empty({N, D}, x.options());
  at::Tensor s = residual.has_value() ? at::empty({N, D}, x.options())
                                       : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rms ? 0 : N}, acc_opts);
  at::Tensor rstd = at::empty({N}, acc_opts);
  if (N == 0) return {y, s, mean, rstd};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastattn::norm_fwd",
                                  [&] {
    using acc = acc_of<scalar_t>;
    std::vector<acc> ones, zeros;
    FwdArgs<scalar_t> a;
    a.x = raw_ptr<scalar_t>(x);
    a.residual = residual.has_value() ? raw_ptr<scalar_t>(*residual) : nullptr;
    a.weight = vector_or<acc>(weight, ones, D, acc(1));
    a.bias = vector_or<acc>(bias, zeros, D, acc(0));
    a.y = raw_ptr<scalar_t>(y);
    a.s = residual.has_value() ? raw_ptr<scalar_t>(s) : nullptr;
    a.mean = rms ? nullptr : mean.data_ptr<acc>();
    a.rstd = rstd.data_ptr<acc>();
    a.D = D;
    a.eps = eps;
    const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / D);
    constexpr bool kConv = !std::is_same_v<raw_of<scalar_t>, acc>;
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc> scratch(kConv ? 2 * D : 0);
      norm_fwd_rows<scalar_t>(a, begin, end, scratch.data());
    });
  });
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const at::Tensor& dy, const std::optional<at::Tensor>& dsum, const at::Tensor& s,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    bool rms, bool want_dweight, bool want_dbias) {
  const int64_t N = s.size(0);
  const int64_t D = s.size(1);
  const auto acc_opts = s.options().dtype(acc_dtype(s.scalar_type()));
  at::Tensor ds = at::empty({N, D}, s.options());
  if (N == 0) {
    return {ds, want_dweight ? at::zeros({D}, acc_opts) : at::empty({0}, acc_opts),
            want_dbias ? at::zeros({D}, acc_opts) : at::empty({0}, acc_opts)};
  }
  const int64_t rows_per_block = std::max(kRowBlock, (N + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t n_blocks = (N + rows_per_block - 1) / rows_per_block;
  // One buffer for both partials: [dweight blocks | dbias blocks]
  at::Tensor part = at::empty({(want_dweight + want_dbias) * n_blocks, D}, acc_opts);
  at::Tensor dweight = at::empty({want_dweight ? D : 0}, acc_opts);
  at::Tensor dbias = at::empty({want_dbias ? D : 0}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "fastattn::norm_bwd",
                                  [&] {
    using acc = acc_of<scalar_t>;
    std::vector<acc> ones;
    BwdArgs<scalar_t> a;
    a.dy = raw_ptr<scalar_t>(dy);
    a.dsum = dsum.has_value() ? raw_ptr<scalar_t>(*dsum) : nullptr;
    a.s = raw_ptr<scalar_t>(s);
    a.weight = vector_or<acc>(weight, ones, D, acc(1));
    a.mean = rms ? nullptr : mean.data_ptr<acc>();
    a.rstd = rstd.data_ptr<acc>();
    a.ds = raw_ptr<scalar_t>(ds);
    acc* part_ptr = part.data_ptr<acc>();
    a.dw_part = want_dweight ? part_ptr : nullptr;
    a.db_part = want_dbias ? part_ptr + (want_dweight ? n_blocks * D : 0) : nullptr;
    a.N = N;
    a.D = D;
    a.rows_per_block = rows_per_block;
    const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / (rows_per_block * D));
    constexpr bool kConv = !std::is_same_v<raw_of<scalar_t>, acc>;
    at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc> scratch(kConv ? 4 * D : 0);
      norm_bwd_blocks<scalar_t>(a, begin, end, scratch.data());
    });
    if (want_dweight) reduce_partials<acc>(a.dw_part, n_blocks, D, dweight.data_ptr<acc>());
    if (want_dbias) reduce_partials<acc>(a.db_part, n_blocks, D, dbias.data_ptr<acc>());
  });
  return {ds, dweight, dbias};
}

}  // namespace cpu
}  // namespace fastattn
