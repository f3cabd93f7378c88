// CUDA kernels of the cross-entropy family: cross_entropy_fwd (loss, optionally fused with the
// gradient), token_logprobs_fwd, token_logprobs_bwd and cross_entropy_slice_bwd. The math, gradient derivations and
// conventions (ignored rows, grad_scale, in-place grad) are in
// fastattn/ops/cross_entropy/reference.py; this file only says how it is computed.
//
// Layout of the work: one thread block per row of the (R, C) logits, so a row is reduced with a
// block reduction and never touches global atomics or a second kernel.
//
// Pass 1 (every kernel but token_logprobs_bwd) reads the row once with 16-byte loads and keeps,
// per thread, an online softmax state over s = z (or z / T):
//     m = max s_j,   sum = sum_j exp(s_j - m)                      (rescaled when m grows)
//     ent = sum_j exp(s_j - m) * (s_j - m)                         (token_logprobs entropy only)
//     sz = sum_j z_j  or  sum_j w_j z_j,  sw = sum_j w_j           (label smoothing only)
// then merges the states of the block: lse = m + log(sum), E[s] - lse = ent / sum - log(sum).
// Keeping ent relative to m (not sum p_j s_j) avoids the cancellation lse - E[s] when |s| is
// large and the entropy small. When m grows to m', old terms change as
//     sum' = r * sum,  ent' = r * (ent + sum * (m - m')),  r = exp(m - m').
//
// Pass 2 (cross_entropy_fwd with grad) re-reads the row and writes
//     g_j = scale * (p_j * coef - eps * w_j / C - [j == t] * (1 - eps) * w_t),
//     coef = (1 - eps) * w_t + eps * W / C + 2 * z_loss * lse,   p_j = exp(z_j - lse).
// It walks the row backwards: the end of the row was read last in pass 1 and is the most
// likely to still be in L2. With one row per block, the rows in flight on the GPU are about
// (#SMs * rows per SM) * row bytes, e.g. 132 * 256 KiB = 33 MiB for a 131072-class bf16 row and
// 1024-thread blocks, which fits the 50-60 MB L2 of an H100/H200: HBM then sees about one read
// and one write of the logits (2 * R * C * bytes) instead of three passes. Pass-2 loads and all
// gradient stores use the evict-first (.cs) hint so that they do not push out rows whose pass 2
// is still to come.
//
// token_logprobs_bwd is a single read + write: p is rebuilt from the saved lse.
//
// Memory traffic per row (B = bytes per element): cross_entropy_fwd without grad and
// token_logprobs_fwd read C * B; cross_entropy_fwd with grad reads 2 * C * B (the second mostly
// from L2) and writes C * B; token_logprobs_bwd reads and writes C * B. Ignored rows of the
// gradient kernels write zeros without reading the logits.
//
// exp is computed as exp2((s - pivot) * log2 e) with one MUFU.EX2 per element (+1 per 16-byte
// vector for the rescale of pass 1). The subtraction comes first, so for the terms that matter
// (s near the max) it is exact and only the product is rounded. Per element that is ~5 FP32
// instructions and one MUFU op; an H200 streaming bf16 at full HBM rate needs ~10 elements per
// SM clock, under the 16/clk MUFU and 128/clk FP32 throughputs.
//
// In-place gradient (grad is the logits tensor): every element of a row is read in pass 2 by
// the same thread that then overwrites it, and pass 1 (and the read of z_t) is separated from
// pass 2 by the __syncthreads of the block reduction. Rows are disjoint (checked by the binding).
//
// Indexing: row offsets are int64 (row * stride can pass 2^31 elements); column indices are int
// (C < 2^30 is checked by the binding).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.cuh"
#include "ops.h"

namespace fastattn {
namespace {

using dev::block_allreduce;
using dev::fast_exp2;
using dev::from_float;
using dev::kLog2e;
using dev::kMaxBlockThreads;
using dev::ld16;
using dev::ld16_stream;
using dev::neg_inf;
using dev::Pack16;
using dev::quiet_nan;
using dev::RowSplit;
using dev::split_row;
using dev::st16_stream;
using dev::to_float;

// Each thread issues kUnroll independent 16-byte loads before using any of them. Bandwidth is
// bytes in flight / latency: an H200 needs ~4.8 TB/s * ~0.7 us ~ 3.4 MB in flight, ~26 KB per
// SM; 1024 resident threads * 4 * 16 B = 64 KB per SM covers it with margin (so an SM stalled
// at a row boundary is made up by the others), while 4 uint4 buffers cost only 16 registers.
constexpr int kUnroll = 4;
// Block size: the smallest power of two in [64, 1024] giving each thread at most ~16 vectors
// of the row. Large vocabularies (C = 128k bf16: 16k vectors) get 1024 threads, so the rows in
// flight stay within L2 for the re-read of pass 2 (see above); smaller rows get smaller blocks,
// so several rows share an SM and one block's reduction/launch gap is hidden by the others.
// The register cap of __launch_bounds__(1024) (64 per thread) keeps 1024 threads per SM
// resident whatever the block size.
constexpr int kVecsPerThread = 16;
constexpr int kMinThreads = 64;

// ---------------------------------------------------------------------------------------------
// Online softmax state and its merge.
// ---------------------------------------------------------------------------------------------
struct RowStats {
  float m;    // running max of s (-inf before any element)
  float sum;  // sum_j exp(s_j - m)
  float ent;  // sum_j exp(s_j - m) * (s_j - m)        (only updated when kEnt)
  float sz;   // sum_j w_j (z_j - pivot), w_j = 1 when kSmooth == 1   (only when kSmooth)
  float sw;   // sum_j w_j (kSmooth == 1: the element count)         (only when kSmooth)
};

// The pivot of a state: its max, or 0 while that is -inf (see online_update).
__device__ __forceinline__ float pivot_of(float m) { return m == neg_inf() ? 0.0f : m; }

__device__ __forceinline__ RowStats stats_identity() {
  return RowStats{neg_inf(), 0.0f, 0.0f, 0.0f, 0.0f};
}

// The pivot is the running max, or 0 while the max is still -inf: then exp(-inf - 0) = 0
// instead of exp(-inf - -inf) = NaN, so rows (or thread slices) made only of -inf stay
// {m = -inf, sum = 0}. fmaxf(d, -FLT_MAX) turns the weight (s - m) = -inf of a -inf element into
// a finite number, so its entropy term is 0 * finite = 0 instead of NaN (the reference would give
// NaN there; p log p -> 0 is the right limit). NaN logits still propagate into sum.
template <int N, bool kEnt>
__device__ __forceinline__ void online_update(RowStats& st, const float (&s)[N]) {
  float mx = s[0];
#pragma unroll
  for (int i = 1; i < N; ++i) mx = fmaxf(mx, s[i]);
  const float m_new = fmaxf(st.m, mx);
  const float pivot = m_new == neg_inf() ? 0.0f : m_new;
  const float dm = st.m - pivot;
  const float r = fast_exp2(dm * kLog2e);
  if (kEnt) st.ent = r * fmaf(st.sum, fmaxf(dm, -FLT_MAX), st.ent);
  st.sum *= r;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float d = s[i] - pivot;
    const float e = fast_exp2(d * kLog2e);
    st.sum += e;
    if (kEnt) st.ent = fmaf(e, fmaxf(d, -FLT_MAX), st.ent);
  }
  st.m = m_new;
}

// Symmetric in (x, y) bit for bit, as block_allreduce requires: the products are rounded with
// __fmul_rn so that nvcc cannot contract one of them into an FMA with the other.
struct MergeStats {
  __device__ __forceinline__ RowStats operator()(const RowStats& x, const RowStats& y) const {
    const float m = fmaxf(x.m, y.m);
    const float pivot = m == neg_inf() ? 0.0f : m;
    const float dx = x.m - pivot;
    const float dy = y.m - pivot;
    const float rx = fast_exp2(dx * kLog2e);
    const float ry = fast_exp2(dy * kLog2e);
    RowStats o;
    o.m = m;
    o.sum = __fmul_rn(x.sum, rx) + __fmul_rn(y.sum, ry);
    o.ent = __fmul_rn(rx, fmaf(x.sum, fmaxf(dx, -FLT_MAX), x.ent)) +
            __fmul_rn(ry, fmaf(y.sum, fmaxf(dy, -FLT_MAX), y.ent));
    // sz is relative to each state's pivot: moved to the merged one, sz - (pivot - p) * sw
    o.sz = (x.sz - __fmul_rn(pivot - pivot_of(x.m), x.sw)) +
           (y.sz - __fmul_rn(pivot - pivot_of(y.m), y.sw));
    o.sw = x.sw + y.sw;
    return o;
  }
};

// s = z / T as the rounded product z * (1/T), never fused into a following subtraction (an FMA
// would compare the unrounded product with a max taken of rounded ones: the max element's
// exp argument then errs by ~|s| 2^-24, hundreds at |s| ~ 1e9, so inf / NaN, and at ordinary
// |s| log-probs come out positive). __fmul_rn is never contracted.
__device__ __forceinline__ float scaled(float z, float inv_t) { return __fmul_rn(z, inv_t); }

// Pass 1 over one row x (C elements, split sp): folds s = z * inv_t (z itself when !kScale)
// into st; with kSmooth also sum w (z - pivot) and sum w (w = 1 when kSmooth == 1), kept
// relative to the running pivot so that the smoothing term W log(sum) - sz has no
// cancellation of two large numbers at a large common offset of the logits.
template <typename T, bool kScale, bool kEnt, int kSmooth>
__device__ __forceinline__ void accumulate_row(const T* x, const RowSplit& sp, int C, float inv_t,
                                               const float* __restrict__ weight, RowStats& st) {
  constexpr int kN = Pack16<T>::kN;
  const int tid = threadIdx.x;
  const int nthr = blockDim.x;

  // sz -= (new pivot - old pivot) * sw: the earlier terms re-expressed against the new pivot
  auto shift = [&](float old_pivot) {
    if (kSmooth != 0) st.sz = fmaf(-(pivot_of(st.m) - old_pivot), st.sw, st.sz);
  };
  auto fold_scalar = [&](int col) {
    const float z = to_float(x[col]);
    const float s[1] = {kScale ? scaled(z, inv_t) : z};
    const float old_pivot = pivot_of(st.m);
    online_update<1, kEnt>(st, s);
    shift(old_pivot);
    if (kSmooth != 0) {
      const float w = kSmooth == 2 ? weight[col] : 1.0f;
      st.sz = fmaf(w, z - pivot_of(st.m), st.sz);
      st.sw += w;
    }
  };
  // Fewer than 2 * kN <= 14 scalar columns, always within the first warp.
  if (tid < sp.head) fold_scalar(tid);
  if (tid < C - sp.tail_begin) fold_scalar(sp.tail_begin + tid);

  const uint4* xv = reinterpret_cast<const uint4*>(x + sp.head);
  for (int v0 = tid; v0 < sp.nvec; v0 += kUnroll * nthr) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * nthr;
      if (v < sp.nvec) raw[u] = ld16(xv + v);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * nthr;
      if (v < sp.nvec) {
        float z[kN];
        Pack16<T>::unpack(raw[u], z);
        float s[kN];
#pragma unroll
        for (int i = 0; i < kN; ++i) s[i] = kScale ? scaled(z[i], inv_t) : z[i];
        const float old_pivot = pivot_of(st.m);
        online_update<kN, kEnt>(st, s);
        if (kSmooth != 0) {
          shift(old_pivot);
          const float p = pivot_of(st.m);
          const int col0 = sp.head + v * kN;
#pragma unroll
          for (int i = 0; i < kN; ++i) {
            const float w = kSmooth == 2 ? weight[col0 + i] : 1.0f;
            st.sz = fmaf(w, z[i] - p, st.sz);
            st.sw += w;
          }
        }
      }
    }
  }
}

// Writes g_j = f(z_j, j) for every column j of the row: reads x, writes g (both C elements; g
// may be x itself). The row is walked from the end when kReverse. Vector stores when g has the
// same 16-byte alignment as x (always so in place), element stores otherwise. Every element is
// read and written by the same thread, so in place is safe without a barrier.
template <typename T, bool kReverse, typename F>
__device__ __forceinline__ void map_row(const T* x, T* g, const RowSplit& sp, int C, F f) {
  constexpr int kN = Pack16<T>::kN;
  const int tid = threadIdx.x;
  const int nthr = blockDim.x;

  const uint4* xv = reinterpret_cast<const uint4*>(x + sp.head);
  T* gh = g + sp.head;
  const bool g_vec = (reinterpret_cast<uintptr_t>(gh) & 15u) == 0;
  for (int v0 = tid; v0 < sp.nvec; v0 += kUnroll * nthr) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * nthr;
      if (v < sp.nvec) raw[u] = ld16_stream(xv + (kReverse ? sp.nvec - 1 - v : v));
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * nthr;
      if (v < sp.nvec) {
        const int vi = kReverse ? sp.nvec - 1 - v : v;
        float y[kN];
        Pack16<T>::unpack(raw[u], y);
        const int col0 = sp.head + vi * kN;
#pragma unroll
        for (int i = 0; i < kN; ++i) y[i] = f(y[i], col0 + i);
        if (g_vec) {
          st16_stream(reinterpret_cast<uint4*>(gh) + vi, Pack16<T>::pack(y));
        } else {
#pragma unroll
          for (int i = 0; i < kN; ++i) gh[vi * kN + i] = from_float<T>(y[i]);
        }
      }
    }
  }
  if (tid < sp.head) g[tid] = from_float<T>(f(to_float(x[tid]), tid));
  if (tid < C - sp.tail_begin) {
    const int col = sp.tail_begin + tid;
    g[col] = from_float<T>(f(to_float(x[col]), col));
  }
}

// The gradient row of an ignored target: exact zeros, without reading the logits.
template <typename T>
__device__ __forceinline__ void zero_row(T* g, int C) {
  const RowSplit sp = split_row(g, C);
  const int tid = threadIdx.x;
  const T zero = from_float<T>(0.0f);
  if (tid < sp.head) g[tid] = zero;
  if (tid < C - sp.tail_begin) g[sp.tail_begin + tid] = zero;
  uint4* gv = reinterpret_cast<uint4*>(g + sp.head);
  const uint4 z4 = make_uint4(0u, 0u, 0u, 0u);
  for (int v = tid; v < sp.nvec; v += blockDim.x) st16_stream(gv + v, z4);
}

// ---------------------------------------------------------------------------------------------
// cross_entropy_fwd
// ---------------------------------------------------------------------------------------------
template <typename T>
struct CeArgs {
  const T* logits;
  int64_t logits_row_stride;
  const int64_t* target;
  const float* weight;      // (C,) or nullptr
  const float* grad_scale;  // 0-dim or nullptr
  T* grad;                  // (R, C) or nullptr
  int64_t grad_row_stride;
  float* loss;
  int n_classes;
  int64_t ignore_index;
  float eps;             // label smoothing
  float one_minus_eps;   // 1 - eps, rounded once from double
  float eps_over_c;      // eps / C, rounded once from double
  float z_loss;
};

// kSmooth: 0 when eps == 0 (no z or w sums needed), 1 for unweighted, 2 for weighted smoothing.
// An out-of-range (non-ignored) target makes z_t and w_t NaN: NaN loss and NaN gradient row.
template <typename T, bool kGrad, int kSmooth>
__global__ void __launch_bounds__(kMaxBlockThreads) cross_entropy_fwd_kernel(const CeArgs<T> a) {
  const int64_t row = blockIdx.x;
  const int C = a.n_classes;
  const int tid = threadIdx.x;
  const int64_t t = a.target[row];
  if (t == a.ignore_index) {  // uniform over the block: it leaves before any barrier
    if (tid == 0) a.loss[row] = 0.0f;
    if (kGrad) zero_row(a.grad + row * a.grad_row_stride, C);
    return;
  }
  const bool t_ok = t >= 0 && t < C;
  const int t_col = t_ok ? static_cast<int>(t) : -1;
  const T* x = a.logits + row * a.logits_row_stride;
  // Read before the reduction's barrier, hence before any in-place write of pass 2.
  const float z_t = (tid == 0 && t_ok) ? to_float(x[t_col]) : quiet_nan();
  const float w_t = t_ok ? (a.weight != nullptr ? a.weight[t_col] : 1.0f) : quiet_nan();
  const float scale = (kGrad && a.grad_scale != nullptr) ? *a.grad_scale : 1.0f;

  const RowSplit sp = split_row(x, C);
  RowStats st = stats_identity();
  accumulate_row<T, false, false, kSmooth>(x, sp, C, 1.0f, a.weight, st);
  __shared__ RowStats smem[kMaxBlockThreads / dev::kWarpSize];
  st = block_allreduce(st, MergeStats{}, stats_identity(), smem);

  // lse - z_t as (m - z_t) + log(sum) and p_j as exp(z_j - m) / sum: lse itself rounds at a
  // large common offset of the logits (ulp(1e4) ~ 1e-3 in fp32), these do not.
  const float log_sum = logf(st.sum);
  const float lse = st.m + log_sum;
  const float W = kSmooth == 2 ? st.sw : static_cast<float>(C);
  if (tid == 0) {
    float loss = a.one_minus_eps * w_t * ((st.m - z_t) + log_sum);
    // eps / C * sum_j w_j (lse - z_j) = eps / C * (W log(sum) - sum_j w_j (z_j - m))
    if (kSmooth != 0) loss += a.eps_over_c * (W * log_sum - st.sz);
    loss += a.z_loss * (lse * lse);
    a.loss[row] = loss;
  }

  if (kGrad) {
    const float coef =
        (a.one_minus_eps * w_t + a.eps * W / static_cast<float>(C) + 2.0f * a.z_loss * lse) *
        scale;
    const float p_coef = coef / st.sum;
    const float m = st.m;
    const float t_coef = a.one_minus_eps * w_t * scale;
    const float s_coef = a.eps_over_c * scale;
    const float* __restrict__ weight = a.weight;
    auto grad_of = [&](float z, int col) {
      float g = fast_exp2((z - m) * kLog2e) * p_coef;
      if (kSmooth == 1) g -= s_coef;
      if (kSmooth == 2) g = fmaf(-s_coef, weight[col], g);
      if (col == t_col) g -= t_coef;
      return g;
    };
    map_row<T, /*kReverse=*/true>(x, a.grad + row * a.grad_row_stride, sp, C, grad_of);
  }
}

// ---------------------------------------------------------------------------------------------
// token_logprobs_fwd / token_logprobs_bwd  (s = z * inv_t)
// ---------------------------------------------------------------------------------------------
template <typename T>
struct TokFwdArgs {
  const T* logits;
  int64_t logits_row_stride;
  const int64_t* target;
  float* logp;
  float* entropy;  // nullptr unless kEnt
  float* lse;
  int n_classes;
  int64_t ignore_index;
  float inv_t;
};

// Ignored rows still compute their lse (the reference returns the true lse there).
template <typename T, bool kEnt>
__global__ void __launch_bounds__(kMaxBlockThreads)
    token_logprobs_fwd_kernel(const TokFwdArgs<T> a) {
  const int64_t row = blockIdx.x;
  const int C = a.n_classes;
  const int tid = threadIdx.x;
  const int64_t t = a.target[row];
  const bool valid = t != a.ignore_index;
  const bool t_ok = valid && t >= 0 && t < C;
  const T* x = a.logits + row * a.logits_row_stride;
  const float s_t = (tid == 0 && t_ok) ? scaled(to_float(x[t]), a.inv_t) : quiet_nan();

  const RowSplit sp = split_row(x, C);
  RowStats st = stats_identity();
  accumulate_row<T, true, kEnt, 0>(x, sp, C, a.inv_t, nullptr, st);
  __shared__ RowStats smem[kMaxBlockThreads / dev::kWarpSize];
  st = block_allreduce(st, MergeStats{}, stats_identity(), smem);

  if (tid == 0) {
    const float log_sum = logf(st.sum);
    const float lse = st.m + log_sum;
    a.lse[row] = lse;
    a.logp[row] = valid ? (s_t - st.m) - log_sum : 0.0f;
    // entropy = lse - E[s] = log(sum) - ent / sum
    if (kEnt) a.entropy[row] = valid ? log_sum - st.ent / st.sum : 0.0f;
  }
}

template <typename T>
struct TokBwdArgs {
  const T* logits;
  int64_t logits_row_stride;
  const int64_t* target;
  const float* lse;
  const float* entropy;       // nullptr unless kEnt
  const float* grad_logp;
  const float* grad_entropy;  // nullptr unless kEnt
  T* grad;
  int64_t grad_row_stride;
  int n_classes;
  int64_t ignore_index;
  float inv_t;
};

// g_k = p_k * (c0 + c1 * (s_k - E[s])) + [k == t] * inv_t * g_logp,
//   c0 = -inv_t * g_logp,  c1 = -inv_t * g_entropy,  E[s] = lse - entropy,
// i.e. inv_t * (g_logp * ([k == t] - p_k) - g_entropy * p_k * (s_k - E[s])).
// An out-of-range (non-ignored) target gives a NaN row.
template <typename T, bool kEnt>
__global__ void __launch_bounds__(kMaxBlockThreads)
    token_logprobs_bwd_kernel(const TokBwdArgs<T> a) {
  const int64_t row = blockIdx.x;
  const int C = a.n_classes;
  const int64_t t = a.target[row];
  T* g = a.grad + row * a.grad_row_stride;
  if (t == a.ignore_index) {
    zero_row(g, C);
    return;
  }
  const bool t_ok = t >= 0 && t < C;
  const int t_col = t_ok ? static_cast<int>(t) : -1;
  const float inv_t = a.inv_t;
  const float lse = a.lse[row];
  const float g_logp = t_ok ? a.grad_logp[row] : quiet_nan();
  const float c0 = -inv_t * g_logp;
  const float c_t = inv_t * g_logp;
  float c1 = 0.0f;
  float mean_s = 0.0f;
  if (kEnt) {
    c1 = -inv_t * a.grad_entropy[row];
    mean_s = lse - a.entropy[row];
  }
  auto grad_of = [&](float z, int col) {
    const float s = scaled(z, inv_t);
    const float p = fast_exp2((s - lse) * kLog2e);
    float gk = p * (kEnt ? fmaf(c1, s - mean_s, c0) : c0);
    if (col == t_col) gk += c_t;
    return gk;
  };
  const T* x = a.logits + row * a.logits_row_stride;
  map_row<T, /*kReverse=*/false>(x, g, split_row(x, C), C, grad_of);
}

// ---------------------------------------------------------------------------------------------
// cross_entropy_slice_bwd: the gradient of a softmax loss over a slice of the classes, from the
// whole row's lse (and entropy): the vocabulary-chunked linear cross-entropy / token log-probs.
// One read + one write per element.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct SliceBwdArgs {
  const T* logits;
  int64_t logits_row_stride;
  const int64_t* target;       // column within the slice; outside [0, C): no one-hot term here
  const float* lse;
  const float* entropy;        // nullptr unless kEnt
  const float* row_scale;
  const float* grad_entropy;   // nullptr unless kEnt
  T* grad;
  int64_t grad_row_stride;
  int n_classes;
  float inv_t;
  float target_coef;
  float smoothing;
};

// g_k = c (p_k - smoothing) - c_h p_k (s_k - E[s]) - [k == t] c target_coef,
//   c = row_scale * inv_t, c_h = grad_entropy * inv_t, E[s] = lse - entropy.
// A row with row_scale = 0 (and grad_entropy = 0) is written as zeros without being read.
template <typename T, bool kEnt>
__global__ void __launch_bounds__(kMaxBlockThreads)
    cross_entropy_slice_bwd_kernel(const SliceBwdArgs<T> a) {
  const int64_t row = blockIdx.x;
  const int C = a.n_classes;
  T* g = a.grad + row * a.grad_row_stride;
  const float scale = a.row_scale[row];
  const float h = kEnt ? a.grad_entropy[row] : 0.0f;
  if (scale == 0.0f && h == 0.0f) {
    zero_row(g, C);
    return;
  }
  const int64_t t = a.target[row];
  const int t_col = (t >= 0 && t < C) ? static_cast<int>(t) : -1;
  const float inv_t = a.inv_t;
  const float lse = a.lse[row];
  const float c = scale * inv_t;
  const float c_t = -c * a.target_coef;
  const float c_h = -h * inv_t;
  const float ent = kEnt ? a.entropy[row] : 0.0f;
  const float smooth = a.smoothing;
  auto grad_of = [&](float z, int col) {
    const float d = scaled(z, inv_t) - lse;  // s_k - lse
    const float p = fast_exp2(d * kLog2e);
    float gk = c * (p - smooth);
    // s_k - E[s] = d + entropy, floored so that a -inf logit gives 0 rather than 0 * -inf
    if (kEnt) gk = fmaf(c_h * p, fmaxf(d, -FLT_MAX) + ent, gk);
    if (col == t_col) gk += c_t;
    return gk;
  };
  const T* x = a.logits + row * a.logits_row_stride;
  map_row<T, /*kReverse=*/false>(x, g, split_row(x, C), C, grad_of);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
int threads_for_row(int64_t n_classes, int64_t elem_bytes) {
  const int64_t nvec = (n_classes * elem_bytes + 15) / 16;
  const int64_t want = (nvec + kVecsPerThread - 1) / kVecsPerThread;
  int threads = kMinThreads;
  while (threads < want && threads < kMaxBlockThreads) threads *= 2;
  return threads;
}

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_float_types(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::ScalarType::Float:
      f(TypeTag<float>{});
      break;
    case at::ScalarType::Half:
      f(TypeTag<__half>{});
      break;
    case at::ScalarType::BFloat16:
      f(TypeTag<__nv_bfloat16>{});
      break;
    default:
      FA_CHECK(false, op, ": unsupported logits dtype ", dtype);
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}
template <typename T>
const T* cptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? cptr<T>(*t) : nullptr;
}

}  // namespace

void cross_entropy_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& grad,
                            const std::optional<at::Tensor>& grad_scale, int64_t ignore_index,
                            double label_smoothing, double z_loss, const at::Tensor& loss) {
  const int64_t R = logits.size(0);
  const int64_t C = logits.size(1);
  if (R == 0) return;
  const int smooth = label_smoothing == 0.0 ? 0 : (weight.has_value() ? 2 : 1);
  const bool with_grad = grad.has_value();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(logits.scalar_type(), "cross_entropy_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    CeArgs<T> a;
    a.logits = cptr<T>(logits);
    a.logits_row_stride = logits.stride(0);
    a.target = cptr<int64_t>(target);
    a.weight = cptr_or_null<float>(weight);
    a.grad_scale = cptr_or_null<float>(grad_scale);
    a.grad = with_grad ? mptr<T>(*grad) : nullptr;
    a.grad_row_stride = with_grad ? grad->stride(0) : 0;
    a.loss = mptr<float>(loss);
    a.n_classes = static_cast<int>(C);
    a.ignore_index = ignore_index;
    a.eps = static_cast<float>(label_smoothing);
    a.one_minus_eps = static_cast<float>(1.0 - label_smoothing);
    a.eps_over_c = static_cast<float>(label_smoothing / static_cast<double>(C));
    a.z_loss = static_cast<float>(z_loss);
    const dim3 grid(static_cast<unsigned>(R));
    const dim3 block(threads_for_row(C, sizeof(T)));
    auto launch = [&](auto kernel) {
      kernel<<<grid, block, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (with_grad) {
      if (smooth == 0) launch(cross_entropy_fwd_kernel<T, true, 0>);
      if (smooth == 1) launch(cross_entropy_fwd_kernel<T, true, 1>);
      if (smooth == 2) launch(cross_entropy_fwd_kernel<T, true, 2>);
    } else {
      if (smooth == 0) launch(cross_entropy_fwd_kernel<T, false, 0>);
      if (smooth == 1) launch(cross_entropy_fwd_kernel<T, false, 1>);
      if (smooth == 2) launch(cross_entropy_fwd_kernel<T, false, 2>);
    }
  });
}

void token_logprobs_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                             int64_t ignore_index, double inv_temperature, bool with_entropy,
                             const at::Tensor& logp, const at::Tensor& entropy,
                             const at::Tensor& lse) {
  const int64_t R = logits.size(0);
  const int64_t C = logits.size(1);
  if (R == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(logits.scalar_type(), "token_logprobs_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    TokFwdArgs<T> a;
    a.logits = cptr<T>(logits);
    a.logits_row_stride = logits.stride(0);
    a.target = cptr<int64_t>(target);
    a.logp = mptr<float>(logp);
    a.entropy = with_entropy ? mptr<float>(entropy) : nullptr;
    a.lse = mptr<float>(lse);
    a.n_classes = static_cast<int>(C);
    a.ignore_index = ignore_index;
    a.inv_t = static_cast<float>(inv_temperature);
    const dim3 grid(static_cast<unsigned>(R));
    const dim3 block(threads_for_row(C, sizeof(T)));
    if (with_entropy) {
      token_logprobs_fwd_kernel<T, true><<<grid, block, 0, stream>>>(a);
    } else {
      token_logprobs_fwd_kernel<T, false><<<grid, block, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void token_logprobs_bwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                             const at::Tensor& grad_logp,
                             const std::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& grad, int64_t ignore_index,
                             double inv_temperature) {
  const int64_t R = logits.size(0);
  const int64_t C = logits.size(1);
  if (R == 0) return;
  const bool with_entropy = grad_entropy.has_value();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(logits.scalar_type(), "token_logprobs_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    TokBwdArgs<T> a;
    a.logits = cptr<T>(logits);
    a.logits_row_stride = logits.stride(0);
    a.target = cptr<int64_t>(target);
    a.lse = cptr<float>(lse);
    a.entropy = with_entropy ? cptr<float>(*entropy) : nullptr;
    a.grad_logp = cptr<float>(grad_logp);
    a.grad_entropy = with_entropy ? cptr<float>(*grad_entropy) : nullptr;
    a.grad = mptr<T>(grad);
    a.grad_row_stride = grad.stride(0);
    a.n_classes = static_cast<int>(C);
    a.ignore_index = ignore_index;
    a.inv_t = static_cast<float>(inv_temperature);
    const dim3 grid(static_cast<unsigned>(R));
    const dim3 block(threads_for_row(C, sizeof(T)));
    if (with_entropy) {
      token_logprobs_bwd_kernel<T, true><<<grid, block, 0, stream>>>(a);
    } else {
      token_logprobs_bwd_kernel<T, false><<<grid, block, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void cross_entropy_slice_bwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                                  const at::Tensor& row_scale,
                                  const std::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& grad, double inv_temperature,
                                  double target_coef, double smoothing) {
  const int64_t R = logits.size(0);
  const int64_t C = logits.size(1);
  if (R == 0) return;
  const bool with_entropy = grad_entropy.has_value();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(logits.scalar_type(), "cross_entropy_slice_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    SliceBwdArgs<T> a;
    a.logits = cptr<T>(logits);
    a.logits_row_stride = logits.stride(0);
    a.target = cptr<int64_t>(target);
    a.lse = cptr<float>(lse);
    a.entropy = with_entropy ? cptr<float>(*entropy) : nullptr;
    a.row_scale = cptr<float>(row_scale);
    a.grad_entropy = with_entropy ? cptr<float>(*grad_entropy) : nullptr;
    a.grad = mptr<T>(grad);
    a.grad_row_stride = grad.stride(0);
    a.n_classes = static_cast<int>(C);
    a.inv_t = static_cast<float>(inv_temperature);
    a.target_coef = static_cast<float>(target_coef);
    a.smoothing = static_cast<float>(smoothing);
    const dim3 grid(static_cast<unsigned>(R));
    const dim3 block(threads_for_row(C, sizeof(T)));
    if (with_entropy) {
      cross_entropy_slice_bwd_kernel<T, true><<<grid, block, 0, stream>>>(a);
    } else {
      cross_entropy_slice_bwd_kernel<T, false><<<grid, block, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastattn
