// Flash attention on the CPU: tiled forward and backward that never hold an Sq x Sk matrix.
//
// The math and conventions are those of fastattn/ops/attention/reference.py (masking rule,
// softcap, bias, the dropout hash, lse, fully masked rows). Here the block products go to the
// BLAS torch links (MKL or OpenBLAS sgemm, single-threaded inside our parallel region) and everything between them — scaling, soft-capping, bias, masks, the
// online softmax, dropout — runs in vectorised loops over the block in cache.
//
// Forward: one task per (batch, head, block of kBlockM queries). For each block of kBlockN keys
// that some query of the block can see: S = Q K^T (kBlockM x kBlockN), the running max m and
// sum l are updated (the output accumulator is rescaled by exp(m_old - m_new)), P = exp(S - m)
// overwrites S and O += P V. At the end O /= l and lse = m + log l. Key blocks no query sees are
// never touched (causal: about half of them), and a block needs element masks only where it
// straddles the diagonal or the window edge.
//
// Backward (FlashAttention-2): for each key block, over the query blocks that see it, recompute
// P = exp(S - lse) from the saved lse, then dV += P~^T dO, dP = dO V^T, dS = P * (dP - delta),
// dK += dS^T Q, dQ += dS K: five block products, the minimum, each over only the key columns
// that some row of the tile sees (visible_cols). One task per (batch, query head)
// owns that head's dQ, so no two threads ever add into the same memory. With too few such pairs
// to keep the threads busy the work splits by blocks instead: one task per (head, key block)
// for dK and dV, one per (head, query block) for dQ, which recomputes its tiles' P and dS
// (seven products per tile, over every thread). With GQA the per-query-head dK/dV go to an fp32
// buffer that is summed over each group of heads afterwards.
//
// Packed sequences (varlen) run through the same two kernels: batch entry b is then sequence b
// of the packed (total, H, D) tensors, with its own lengths and bottom-right diagonal
// (Problem::sequence) and its rows found through cu_seqlens (head_rows). The forward grid is
// sized by the longest sequence; blocks past a shorter one's end are skipped.

#include "ops.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

// Query and key block sizes. A kBlockM x kBlockN score block (32 KB in fp32 at 64 x 128) and
// the kBlockN x D key/value blocks stay in L2 between the two products that use them; 64 rows
// give MKL's sgemm micro-kernels a long enough M, and the 128-wide key block halves the number
// of online-softmax rescales of the output accumulator compared with 64.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 128;
constexpr int64_t kLanes = 16;  // independent accumulators, so max/sum loops vectorise

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- block products ------------------------------------------------------------------------
//
// The products go to the Fortran BLAS sgemm that the torch library exports (MKL in the x86
// wheels, OpenBLAS elsewhere), declared weak so that this extension still loads where it is
// missing; there, and when FASTATTN_CPU_BLAS=0, a plain loop product runs instead (correct,
// several times slower). Called from inside at::parallel_for, MKL runs single-threaded.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

bool use_blas() {
  const char* env = std::getenv("FASTATTN_CPU_BLAS");
  return sgemm_ != nullptr && !(env != nullptr && env[0] == '0');
}

// Row-major C (m x n) = alpha * op(A) op(B) + beta * C, with op(A) m x k and op(B) k x n.
FA_ROW_KERNEL void gemm_loops(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                              float alpha, const float* a, int64_t lda, const float* b,
                              int64_t ldb, float beta, float* c, int64_t ldc) {
  std::vector<float> row(static_cast<size_t>(n));
  for (int64_t i = 0; i < m; ++i) {
    std::fill(row.begin(), row.end(), 0.f);
    for (int64_t p = 0; p < k; ++p) {
      const float aip = trans_a ? a[p * lda + i] : a[i * lda + p];
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) row[j] += aip * b[j * ldb + p];
      } else {
        const float* bp = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) row[j] += aip * bp[j];
      }
    }
    float* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = alpha * row[j] + (beta == 0.f ? 0.f : beta * ci[j]);
  }
}

// Products with a handful of rows (KV-cache decoding: one new query per sequence), where a BLAS
// call costs more than its arithmetic: direct loops over contiguous rows, kLanes partial sums.
constexpr int64_t kSmallM = 4;

FA_ROW_KERNEL void gemm_small_m(bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                                const float* a, int64_t lda, const float* b, int64_t ldb,
                                float beta, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    const float* FA_RESTRICT ai = a + i * lda;
    float* FA_RESTRICT ci = c + i * ldc;
    if (trans_b) {  // c_ij = alpha a_i . b_j + beta c_ij
      for (int64_t j = 0; j < n; ++j) {
        const float* FA_RESTRICT bj = b + j * ldb;
        float part[kLanes] = {};
        int64_t p = 0;
        for (; p + kLanes <= k; p += kLanes)
          for (int64_t l = 0; l < kLanes; ++l) part[l] += ai[p + l] * bj[p + l];
        float acc = 0.f;
        for (int64_t l = 0; l < kLanes; ++l) acc += part[l];
        for (; p < k; ++p) acc += ai[p] * bj[p];
        ci[j] = alpha * acc + (beta == 0.f ? 0.f : beta * ci[j]);
      }
    } else {  // c_i = alpha sum_p a_ip b_p + beta c_i: axpy over the rows of B
      if (beta == 0.f) {
        std::fill(ci, ci + n, 0.f);
      } else if (beta != 1.f) {
        for (int64_t j = 0; j < n; ++j) ci[j] *= beta;
      }
      for (int64_t p = 0; p < k; ++p) {
        const float s = alpha * ai[p];
        const float* FA_RESTRICT bp = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) ci[j] += s * bp[j];
      }
    }
  }
}

void gemm(bool blas, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (!trans_a && m <= kSmallM) {
    gemm_small_m(trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // BLAS wants each leading dimension at least the row length it steps over; a caller's
  // tensor can have less (stride 0 from expand(), rows that overlap): the loops take any.
  const bool ld_ok = lda >= std::max<int64_t>(1, trans_a ? m : k) &&
                     ldb >= std::max<int64_t>(1, trans_b ? k : n) && ldc >= std::max<int64_t>(1, n);
  if (!blas || !ld_ok || std::max({m, n, k, lda, ldb, ldc}) > kIntMax) {
    gemm_loops(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // BLAS is column-major, where a row-major matrix reads as its transpose:
  // C^T = op(B)^T op(A)^T, i.e. swap the operands and keep each one's transpose flag.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb);
  const int ildc = static_cast<int>(ldc);
  sgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
}

// ---- dropout: the counter hash of reference.py, bit for bit ---------------------------------

FA_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  float p = 0.f;
  float inv_keep = 1.f;  // 1 / (1 - p)
  uint32_t threshold = 0;
  uint64_t seed = 0;
  bool on() const { return p > 0.f; }
  uint32_t key(int64_t bh) const {
    return mix32(mix32(static_cast<uint32_t>(bh) ^ static_cast<uint32_t>(seed >> 32)) ^
                 static_cast<uint32_t>(seed));
  }
};

// x[c] *= keep(i, j0 + c) / (1 - p) for c < n.
FA_ROW_KERNEL void apply_dropout(float* FA_RESTRICT x, int64_t n, uint32_t key, uint32_t row_base,
                                 uint32_t threshold, float inv_keep) {
  for (int64_t c = 0; c < n; ++c) {
    const uint32_t r = mix32(mix32(row_base + static_cast<uint32_t>(c)) ^ key);
    x[c] = r >= threshold ? x[c] * inv_keep : 0.f;
  }
}

// ---- problem description ---------------------------------------------------------------------

struct Problem {
  int64_t B, H, Hkv, Sq, Sk, D;
  float scale, softcap;
  int64_t diag, window_left, window_right;
  Dropout dropout;
  bool blas = true;
  const float* bias = nullptr;  // fp32, read through its strides (0 = broadcast)
  int64_t bias_sb = 0, bias_sh = 0, bias_si = 0, bias_sj = 0;
  // Packed sequences: batch entry b is tokens [cu_q[b], cu_q[b + 1]) of q and
  // [cu_k[b], cu_k[b + 1]) of k and v; Sq, Sk are then the longest lengths. Null when dense.
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;

  // The problem of batch entry b alone: itself when dense, else that sequence's lengths with
  // its causal diagonal aligned bottom-right (FlashAttention's varlen convention).
  Problem sequence(int64_t b) const {
    if (cu_q == nullptr) return *this;
    Problem s = *this;
    s.Sq = cu_q[b + 1] - cu_q[b];
    s.Sk = cu_k[b + 1] - cu_k[b];
    s.diag = s.Sk - s.Sq;
    return s;
  }

  int64_t group() const { return H / Hkv; }
  // Visible keys of query i: [lo(i), hi(i)); both are non-decreasing in i.
  int64_t lo(int64_t i) const {
    return window_left < 0 ? 0 : std::max<int64_t>(0, i + diag - window_left);
  }
  int64_t hi(int64_t i) const {
    return window_right < 0 ? Sk : std::min<int64_t>(Sk, i + diag + window_right + 1);
  }
};

Problem describe(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& bias,
                 double scale, int64_t diag, int64_t window_left, int64_t window_right,
                 double softcap, double dropout_p, int64_t seed) {
  Problem p;
  p.blas = use_blas();
  p.B = q.size(0);
  p.H = q.size(1);
  p.Sq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Sk = k.size(2);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.diag = diag;
  p.window_left = window_left;
  p.window_right = window_right;
  if (dropout_p > 0) {
    p.dropout.p = static_cast<float>(dropout_p);
    p.dropout.inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
    p.dropout.threshold =
        static_cast<uint32_t>(std::min(std::floor(dropout_p * 4294967296.0), 4294967295.0));
    p.dropout.seed = static_cast<uint64_t>(seed);
  }
  if (bias.has_value()) {
    p.bias = bias->data_ptr<float>();
    p.bias_sb = bias->stride(0);
    p.bias_sh = bias->stride(1);
    p.bias_si = bias->stride(2);
    p.bias_sj = bias->stride(3);
  }
  return p;
}

// The rows of batch entry b, head h in a tensor laid out (B, H, S, D), or (total, H, D) when
// packed (cu: the prefix sums of its token axis): element offset of row 0 and the row stride.
struct HeadRows {
  int64_t offset, ld;
};

FA_INLINE HeadRows head_rows(const at::Tensor& t, const int32_t* cu, int64_t b, int64_t h) {
  if (cu != nullptr) return {cu[b] * t.stride(0) + h * t.stride(1), t.stride(0)};
  return {b * t.stride(0) + h * t.stride(1), t.stride(2)};
}

// Offset of the lse of row 0 of (b, h); rows are consecutive: lse is (B, H, Sq) contiguous, or
// (H, total_q) when packed.
FA_INLINE int64_t lse_rows(const at::Tensor& lse, const int32_t* cu_q, int64_t b, int64_t h) {
  return cu_q != nullptr ? h * lse.stride(0) + cu_q[b] : b * lse.stride(0) + h * lse.stride(1);
}

// Rows of a (S, D) slice of a (B, H, S, D) tensor as fp32 with row stride *ld: the tensor's own
// memory when it is fp32 already, else converted into buf.
template <typename scalar_t>
const float* rows_fp32(const scalar_t* src, int64_t row_stride, int64_t rows, int64_t d,
                       std::vector<float>& buf, int64_t* ld) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    *ld = row_stride;
    return src;
  } else {
    using E = Elem<scalar_t>;
    buf.resize(static_cast<size_t>(rows * d));
    const auto* raw = reinterpret_cast<const typename E::raw*>(src);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < d; ++c) buf[r * d + c] = E::load(raw[r * row_stride + c]);
    *ld = d;
    return buf.data();
  }
}

template <typename scalar_t>
FA_INLINE void store_row(scalar_t* dst, const float* src, int64_t n, float mul) {
  using E = Elem<scalar_t>;
  auto* raw = reinterpret_cast<typename E::raw*>(dst);
  for (int64_t c = 0; c < n; ++c) raw[c] = E::store(src[c] * mul);
}

// Scores of one block, in place: s = softcap * tanh(s / softcap) (t = tanh kept for backward
// when asked), + bias, and -inf outside [cl, ch). s arrives already multiplied by scale.
FA_ROW_KERNEL void finish_scores(float* FA_RESTRICT s, float* FA_RESTRICT t, int64_t n,
                                 int64_t cl, int64_t ch, float softcap, const float* bias_row,
                                 int64_t bias_sj) {
  if (softcap > 0.f) {
    const float inv = 1.f / softcap;
    for (int64_t c = 0; c < n; ++c) {
      const float th = std::tanh(s[c] * inv);
      if (t != nullptr) t[c] = th;
      s[c] = softcap * th;
    }
  }
  if (bias_row != nullptr) {
    if (bias_sj == 1) {
      for (int64_t c = 0; c < n; ++c) s[c] += bias_row[c];
    } else {
      for (int64_t c = 0; c < n; ++c) s[c] += bias_row[c * bias_sj];
    }
  }
  for (int64_t c = 0; c < std::min(cl, n); ++c) s[c] = kNegInf;
  for (int64_t c = std::max<int64_t>(ch, 0); c < n; ++c) s[c] = kNegInf;
}

// Online-softmax step of one score row: returns the new running max m' = max(m, max_c s_c)
// and overwrites s with exp(s - m'), their sum in *sum. With every score -inf so far
// m' stays -inf and exp(s - 0) = 0 is used instead; a NaN score stays NaN through the sum.
FA_ROW_KERNEL float softmax_step(float* FA_RESTRICT s, int64_t n, float m, float* sum) {
  float lane_max[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane_max[l] = m;
  const int64_t whole = n - n % kLanes;
  for (int64_t c = 0; c < whole; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane_max[l] = s[c + l] > lane_max[l] ? s[c + l] : lane_max[l];
  float mx = m;
  for (int64_t l = 0; l < kLanes; ++l) mx = lane_max[l] > mx ? lane_max[l] : mx;
  for (int64_t c = whole; c < n; ++c) mx = s[c] > mx ? s[c] : mx;
  const float shift = mx == kNegInf ? 0.f : mx;
  const Exp<float> exp_f = Exp<float>::make();
  float lane_sum[kLanes] = {};
  for (int64_t c = 0; c < whole; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const float e = exp_f(s[c + l] - shift);
      s[c + l] = e;
      lane_sum[l] += e;
    }
  float total = 0.f;
  for (int64_t c = whole; c < n; ++c) {
    const float e = exp_f(s[c] - shift);
    s[c] = e;
    total += e;
  }
  for (int64_t l = 0; l < kLanes; ++l) total += lane_sum[l];
  *sum = total;
  return mx;
}

// P = exp(s - lse) for a row (0 for a fully masked row, lse = -inf).
FA_ROW_KERNEL void probs_from_lse(float* FA_RESTRICT s, int64_t n, float lse) {
  const Exp<float> exp_f = Exp<float>::make();
  const float shift = lse == kNegInf ? std::numeric_limits<float>::infinity() : lse;
  for (int64_t c = 0; c < n; ++c) s[c] = exp_f(s[c] - shift);
}

// dS = P * (dP - delta) [* (1 - t^2)], in place of dp.
FA_ROW_KERNEL void score_grad(float* FA_RESTRICT dp, const float* FA_RESTRICT p,
                              const float* FA_RESTRICT t, int64_t n, float delta) {
  if (t != nullptr) {
    for (int64_t c = 0; c < n; ++c) dp[c] = p[c] * (dp[c] - delta) * (1.f - t[c] * t[c]);
  } else {
    for (int64_t c = 0; c < n; ++c) dp[c] = p[c] * (dp[c] - delta);
  }
}

FA_ROW_KERNEL void scale_row(float* FA_RESTRICT x, int64_t n, float a) {
  for (int64_t c = 0; c < n; ++c) x[c] *= a;
}

FA_ROW_KERNEL float dot_row(const float* FA_RESTRICT a, const float* FA_RESTRICT b, int64_t n) {
  float acc = 0.f;
  for (int64_t c = 0; c < n; ++c) acc += a[c] * b[c];
  return acc;
}

// Block r of nb in the order 0, nb - 1, 1, nb - 2, ...: at::parallel_for hands each thread a
// contiguous range of tasks, and under a causal mask a block's work grows with its index
// (queries) or shrinks with it (keys), so consecutive light and heavy blocks even out the
// ranges (with one head on two threads, the forward's halves were 1/4 and 3/4 of the work).
FA_INLINE int64_t zigzag(int64_t r, int64_t nb) { return r % 2 == 0 ? r / 2 : nb - 1 - r / 2; }

// ---- forward -------------------------------------------------------------------------------

template <typename scalar_t>
void forward(const Problem& pr, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             at::Tensor& out, at::Tensor& lse) {
  const int64_t D = pr.D, group = pr.group();
  const int64_t q_blocks = (pr.Sq + kBlockM - 1) / kBlockM;  // of the longest sequence if packed
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();

  at::parallel_for(0, pr.B * pr.H * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf, kbuf, vbuf;
    std::vector<float> s(kBlockM * kBlockN), acc(kBlockM * D), row_max(kBlockM), row_sum(kBlockM);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_blocks, b = bh / pr.H, h = bh % pr.H, hk = h / group;
      const Problem sp = pr.sequence(b);
      const int64_t i0 = zigzag(task % q_blocks, q_blocks) * kBlockM;
      if (i0 >= sp.Sq) continue;  // past the end of a shorter packed sequence
      const int64_t m = std::min(kBlockM, sp.Sq - i0);
      const int64_t j_begin = sp.lo(i0), j_end = sp.hi(i0 + m - 1);
      const HeadRows qr = head_rows(q, pr.cu_q, b, h), kr = head_rows(k, pr.cu_k, b, hk);
      const HeadRows vr = head_rows(v, pr.cu_k, b, hk), outr = head_rows(out, pr.cu_q, b, h);
      const scalar_t* k_head = kp + kr.offset;
      const scalar_t* v_head = vp + vr.offset;
      const float* bias_head = pr.bias ? pr.bias + b * pr.bias_sb + h * pr.bias_sh : nullptr;
      const uint32_t drop_key = pr.dropout.on() ? pr.dropout.key(bh) : 0;

      int64_t ldq;
      const float* qb = rows_fp32(qp + qr.offset + i0 * qr.ld, qr.ld, m, D, qbuf, &ldq);
      std::fill(acc.begin(), acc.begin() + m * D, 0.f);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);

      for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockN) {
        const int64_t n = std::min(kBlockN, j_end - j0);
        int64_t ldk, ldv;
        const float* kb = rows_fp32(k_head + j0 * kr.ld, kr.ld, n, D, kbuf, &ldk);
        gemm(pr.blas, false, true, m, n, D, pr.scale, qb, ldq, kb, ldk, 0.f, s.data(), kBlockN);
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          float* srow = s.data() + r * kBlockN;
          const int64_t cl = sp.lo(i) - j0, ch = sp.hi(i) - j0;
          if (pr.softcap > 0.f || bias_head != nullptr || cl > 0 || ch < n)
            finish_scores(srow, nullptr, n, cl, ch, pr.softcap,
                          bias_head ? bias_head + i * pr.bias_si + j0 * pr.bias_sj : nullptr,
                          pr.bias_sj);
          const float m_old = row_max[r];
          float block_sum;
          const float m_new = softmax_step(srow, n, m_old, &block_sum);
          // Rescale what was accumulated under the old max (nothing yet when it was -inf).
          if (m_new != m_old && m_old != kNegInf) {
            const float alpha = std::exp(m_old - m_new);
            row_sum[r] *= alpha;
            scale_row(acc.data() + r * D, D, alpha);
          }
          row_sum[r] += block_sum;
          row_max[r] = m_new;
          if (pr.dropout.on())
            apply_dropout(srow, n, drop_key,
                          static_cast<uint32_t>(i) * static_cast<uint32_t>(pr.Sk) +
                              static_cast<uint32_t>(j0),
                          pr.dropout.threshold, pr.dropout.inv_keep);
        }
        const float* vb = rows_fp32(v_head + j0 * vr.ld, vr.ld, n, D, vbuf, &ldv);
        gemm(pr.blas, false, false, m, D, n, 1.f, s.data(), kBlockN, vb, ldv, 1.f, acc.data(), D);
      }

      scalar_t* o_rows = op + outr.offset + i0 * outr.ld;
      float* l_rows = lp + lse_rows(lse, pr.cu_q, b, h) + i0;
      for (int64_t r = 0; r < m; ++r) {
        const float l = row_sum[r];
        // l == 0: no visible key (fully masked row): output 0, lse -inf.
        store_row(o_rows + r * outr.ld, acc.data() + r * D, D, l == 0.f ? 0.f : 1.f / l);
        l_rows[r] = l == 0.f ? kNegInf : row_max[r] + std::log(l);
      }
    }
  });
}


// ---- backward ------------------------------------------------------------------------------

// The inputs of one (batch, query head) as fp32 rows: the tensors' memory when fp32, else
// copies of the rows a task reads, query rows [q0, ...) of Q and dO and key rows [k0, ...) of K
// and V; q(i), dout(i), k(j), v(j) address row i (j) of the head.
struct HeadGrad {
  Problem sp;  // this sequence's lengths and diagonal
  const float *Q = nullptr, *dO = nullptr, *K = nullptr, *V = nullptr;  // rows q0 and k0
  int64_t q0 = 0, k0 = 0, ldq = 0, ldo = 0, ldk = 0, ldv = 0;
  const float* L = nullptr;      // lse of row 0
  const float* delta = nullptr;  // dO_i . O_i of row 0
  const float* bias_head = nullptr;
  uint32_t drop_key = 0;

  const float* q(int64_t i) const { return Q + (i - q0) * ldq; }
  const float* dout(int64_t i) const { return dO + (i - q0) * ldo; }
  const float* k(int64_t j) const { return K + (j - k0) * ldk; }
  const float* v(int64_t j) const { return V + (j - k0) * ldv; }
};

// Query rows of [i0, i0 + m) that see some key of [j0, j0 + n): lo(i) < j0 + n and hi(i) > j0,
// a contiguous range since lo and hi are non-decreasing.
FA_INLINE void rows_seeing(const Problem& sp, int64_t i0, int64_t m, int64_t j0, int64_t n,
                           int64_t* begin, int64_t* end) {
  const int64_t first =
      sp.window_right < 0 ? 0 : std::max<int64_t>(0, j0 - sp.diag - sp.window_right);
  const int64_t last =
      sp.window_left < 0 ? sp.Sq : std::min<int64_t>(sp.Sq, j0 + n - sp.diag + sp.window_left);
  *begin = std::max(i0, first);
  *end = std::min(i0 + m, last);
}

// The columns [*c0, *c1) of key block [j0, j0 + n) that some row of [i0, i0 + m) sees (lo and
// hi are non-decreasing, so the rows' visible ranges union to [lo(i0), hi(i0 + m - 1))). The
// tile's other columns are masked for all its rows: P and dS are 0 there and the products can
// leave them out. Under a causal mask this halves the tiles on the diagonal whenever the key
// block is wider than the query block.
FA_INLINE void visible_cols(const Problem& sp, int64_t i0, int64_t m, int64_t j0, int64_t n,
                            int64_t* c0, int64_t* c1) {
  *c0 = std::max(j0, sp.lo(i0));
  *c1 = std::min(j0 + n, sp.hi(i0 + m - 1));
}

// Scratch of one thread: the tile's P (s), its dropped copy (pd), dP then dS (dp), tanh (t).
struct TileScratch {
  std::vector<float> s, dp, pd, t;
  explicit TileScratch(const Problem& pr)
      : s(kBlockM * kBlockN), dp(kBlockM * kBlockN),
        pd(pr.dropout.on() ? kBlockM * kBlockN : 0), t(pr.softcap > 0.f ? kBlockM * kBlockN : 0) {}
  const float* p_out(const Problem& pr) const { return pr.dropout.on() ? pd.data() : s.data(); }
};

// Recomputes the tile of query rows [i0, i0 + m) and keys [j0, j0 + n) of head g:
// s <- P = exp(S - lse), pd <- P~ (P with dropout), dp <- dS = P * (dP - delta) with
// dP = dO V^T (dropped likewise), the softcap's (1 - t^2) included; dS is not yet scaled.
void tile_grads(const Problem& pr, const HeadGrad& g, int64_t i0, int64_t m, int64_t j0,
                int64_t n, TileScratch& w) {
  const Problem& sp = g.sp;
  const bool keep_t = pr.softcap > 0.f;
  const float *Qi = g.q(i0), *dOi = g.dout(i0), *Kj = g.k(j0), *Vj = g.v(j0);
  gemm(pr.blas, false, true, m, n, pr.D, pr.scale, Qi, g.ldq, Kj, g.ldk, 0.f, w.s.data(), kBlockN);
  for (int64_t r = 0; r < m; ++r) {
    const int64_t i = i0 + r;
    float* srow = w.s.data() + r * kBlockN;
    const int64_t cl = sp.lo(i) - j0, ch = sp.hi(i) - j0;
    if (keep_t || g.bias_head != nullptr || cl > 0 || ch < n)
      finish_scores(srow, keep_t ? w.t.data() + r * kBlockN : nullptr, n, cl, ch, pr.softcap,
                    g.bias_head ? g.bias_head + i * pr.bias_si + j0 * pr.bias_sj : nullptr,
                    pr.bias_sj);
    probs_from_lse(srow, n, g.L[i]);
    if (pr.dropout.on()) {
      std::copy(srow, srow + n, w.pd.data() + r * kBlockN);
      apply_dropout(w.pd.data() + r * kBlockN, n, g.drop_key,
                    static_cast<uint32_t>(i) * static_cast<uint32_t>(pr.Sk) +
                        static_cast<uint32_t>(j0),
                    pr.dropout.threshold, pr.dropout.inv_keep);
    }
  }
  gemm(pr.blas, false, true, m, n, pr.D, 1.f, dOi, g.ldo, Vj, g.ldv, 0.f, w.dp.data(), kBlockN);
  for (int64_t r = 0; r < m; ++r) {
    float* dprow = w.dp.data() + r * kBlockN;
    if (pr.dropout.on())
      apply_dropout(dprow, n, g.drop_key,
                    static_cast<uint32_t>(i0 + r) * static_cast<uint32_t>(pr.Sk) +
                        static_cast<uint32_t>(j0),
                    pr.dropout.threshold, pr.dropout.inv_keep);
    score_grad(dprow, w.s.data() + r * kBlockN, keep_t ? w.t.data() + r * kBlockN : nullptr, n,
               g.delta[i0 + r]);
  }
}

template <typename scalar_t>
struct BackwardIO {
  const Problem& pr;
  const at::Tensor &dout, &q, &k, &v, &out, &lse;
  at::Tensor &dq, &dk, &dv;
  bool partial;  // dk, dv: fp32 per-query-head partials (GQA) instead of the outputs

  // Head (b, h) with Q/dO rows [q0, q0 + qm) and K/V rows [k0, k0 + kn) at hand (only those
  // may be read), and its rows' delta.
  HeadGrad head(int64_t b, int64_t h, int64_t q0, int64_t qm, int64_t k0, int64_t kn,
                const float* delta, std::vector<float>* bufs) const {
    HeadGrad g;
    g.sp = pr.sequence(b);
    g.q0 = q0;
    g.k0 = k0;
    const int64_t hk = h / pr.group();
    const HeadRows qr = head_rows(q, pr.cu_q, b, h), dor = head_rows(dout, pr.cu_q, b, h);
    const HeadRows kr = head_rows(k, pr.cu_k, b, hk), vr = head_rows(v, pr.cu_k, b, hk);
    g.Q = rows_fp32(q.data_ptr<scalar_t>() + qr.offset + q0 * qr.ld, qr.ld, qm, pr.D, bufs[0],
                    &g.ldq);
    g.dO = rows_fp32(dout.data_ptr<scalar_t>() + dor.offset + q0 * dor.ld, dor.ld, qm, pr.D,
                     bufs[1], &g.ldo);
    g.K = rows_fp32(k.data_ptr<scalar_t>() + kr.offset + k0 * kr.ld, kr.ld, kn, pr.D, bufs[2],
                    &g.ldk);
    g.V = rows_fp32(v.data_ptr<scalar_t>() + vr.offset + k0 * vr.ld, vr.ld, kn, pr.D, bufs[3],
                    &g.ldv);
    g.L = lse.data_ptr<float>() + lse_rows(lse, pr.cu_q, b, h);
    g.delta = delta;
    g.bias_head = pr.bias ? pr.bias + b * pr.bias_sb + h * pr.bias_sh : nullptr;
    g.drop_key = pr.dropout.on() ? pr.dropout.key(b * pr.H + h) : 0;
    return g;
  }

  // delta_i = dO_i . O_i = sum_j P~_ij dP~_ij (the softmax Jacobian's row term), rows of (b, h).
  // dO's rows come from g when it holds them all (the per-head path converted them already),
  // else they are converted into dobuf.
  void deltas(int64_t b, int64_t h, float* delta, std::vector<float>& obuf,
              std::vector<float>& dobuf, const HeadGrad* g = nullptr) const {
    const Problem sp = pr.sequence(b);
    const HeadRows outr = head_rows(out, pr.cu_q, b, h), dor = head_rows(dout, pr.cu_q, b, h);
    int64_t ldo, ldout;
    const float* dO;
    if (g != nullptr) {
      dO = g->dout(0);
      ldo = g->ldo;
    } else {
      dO = rows_fp32(dout.data_ptr<scalar_t>() + dor.offset, dor.ld, sp.Sq, pr.D, dobuf, &ldo);
    }
    const float* O = rows_fp32(out.data_ptr<scalar_t>() + outr.offset, outr.ld, sp.Sq, pr.D,
                               obuf, &ldout);
    for (int64_t i = 0; i < sp.Sq; ++i) delta[i] = dot_row(dO + i * ldo, O + i * ldout, pr.D);
  }

  // dK, dV rows [j0, j0 + n) of (b, h) from fp32 blocks of n rows.
  void store_kv(int64_t b, int64_t h, int64_t j0, int64_t n, const float* dk_blk,
                const float* dv_blk) const {
    if (n <= 0) return;
    const HeadRows dkr = head_rows(dk, pr.cu_k, b, h), dvr = head_rows(dv, pr.cu_k, b, h);
    const int64_t D = pr.D;
    // (data_ptr<T>() checks the dtype on each call: once per block, not per row)
    if (partial) {
      float* dk0 = dk.data_ptr<float>() + dkr.offset + j0 * dkr.ld;
      float* dv0 = dv.data_ptr<float>() + dvr.offset + j0 * dvr.ld;
      for (int64_t r = 0; r < n; ++r) {
        std::copy(dk_blk + r * D, dk_blk + (r + 1) * D, dk0 + r * dkr.ld);
        std::copy(dv_blk + r * D, dv_blk + (r + 1) * D, dv0 + r * dvr.ld);
      }
    } else {
      scalar_t* dk0 = dk.data_ptr<scalar_t>() + dkr.offset + j0 * dkr.ld;
      scalar_t* dv0 = dv.data_ptr<scalar_t>() + dvr.offset + j0 * dvr.ld;
      for (int64_t r = 0; r < n; ++r) {
        store_row(dk0 + r * dkr.ld, dk_blk + r * D, D, 1.f);
        store_row(dv0 + r * dvr.ld, dv_blk + r * D, D, 1.f);
      }
    }
  }

  void store_q(int64_t b, int64_t h, int64_t i0, int64_t m, const float* dq_rows) const {
    if (m <= 0) return;   // (an empty packed sequence: no row, and no pointer past the end)
    const HeadRows dqr = head_rows(dq, pr.cu_q, b, h);
    scalar_t* dq0 = dq.data_ptr<scalar_t>() + dqr.offset + i0 * dqr.ld;
    for (int64_t r = 0; r < m; ++r) store_row(dq0 + r * dqr.ld, dq_rows + r * pr.D, pr.D, 1.f);
  }

  // dK_j, dV_j of key block [j0, j0 + n) of head g: over the query blocks that see it,
  // dV += P~^T dO and dK += scale dS^T Q; with dq_acc (rows of the head), dQ += scale dS K too.
  void key_block(const HeadGrad& g, int64_t j0, int64_t n, TileScratch& w, float* dk_blk,
                 float* dv_blk, float* dq_acc) const {
    const int64_t D = pr.D;
    int64_t i_begin, i_end;
    rows_seeing(g.sp, 0, g.sp.Sq, j0, n, &i_begin, &i_end);
    std::fill(dk_blk, dk_blk + n * D, 0.f);
    std::fill(dv_blk, dv_blk + n * D, 0.f);
    for (int64_t i0 = i_begin; i0 < i_end; i0 += kBlockM) {
      const int64_t m = std::min(kBlockM, i_end - i0);
      int64_t c0, c1;
      visible_cols(g.sp, i0, m, j0, n, &c0, &c1);
      if (c0 >= c1) continue;
      const int64_t nc = c1 - c0;
      tile_grads(pr, g, i0, m, c0, nc, w);
      gemm(pr.blas, true, false, nc, D, m, 1.f, w.p_out(pr), kBlockN, g.dout(i0), g.ldo, 1.f,
           dv_blk + (c0 - j0) * D, D);
      gemm(pr.blas, true, false, nc, D, m, pr.scale, w.dp.data(), kBlockN, g.q(i0), g.ldq, 1.f,
           dk_blk + (c0 - j0) * D, D);
      if (dq_acc != nullptr)
        gemm(pr.blas, false, false, m, D, nc, pr.scale, w.dp.data(), kBlockN, g.k(c0), g.ldk,
             1.f, dq_acc + i0 * D, D);
    }
  }
};

// Backward (FlashAttention-2). With enough (batch, query head) pairs for the threads, one task
// per pair owns that head's dQ and visits each tile once: five block products per tile, the
// minimum. With few (a long sequence on few heads), that would leave threads idle, so the work
// splits three ways instead (run_backward decides): the rows' delta per head, then one task
// per (head, key block) for dK and dV, then one per (head, query block) for dQ, which
// recomputes its tiles' P and dS: seven block products per tile instead of five, over every
// thread. Either way no two threads add into the same memory.
template <typename scalar_t>
void backward(const Problem& pr, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv, bool partial, bool split) {
  const int64_t D = pr.D, BH = pr.B * pr.H;
  const BackwardIO<scalar_t> io{pr, dout, q, k, v, out, lse, dq, dk, dv, partial};

  if (!split) {
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> bufs[4], obuf, dobuf, delta(pr.Sq), dq_acc(pr.Sq * D);
      std::vector<float> dk_blk(kBlockN * D), dv_blk(kBlockN * D);
      TileScratch w(pr);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / pr.H, h = bh % pr.H;
        const Problem sp = pr.sequence(b);
        const HeadGrad g = io.head(b, h, 0, sp.Sq, 0, sp.Sk, delta.data(), bufs);
        io.deltas(b, h, delta.data(), obuf, dobuf, &g);   // g.delta is filled here
        std::fill(dq_acc.begin(), dq_acc.begin() + sp.Sq * D, 0.f);
        // Every key block is visited, even one no query sees: its dK, dV rows must be written.
        for (int64_t j0 = 0; j0 < sp.Sk; j0 += kBlockN) {
          const int64_t n = std::min(kBlockN, sp.Sk - j0);
          io.key_block(g, j0, n, w, dk_blk.data(), dv_blk.data(), dq_acc.data());
          io.store_kv(b, h, j0, n, dk_blk.data(), dv_blk.data());
        }
        io.store_q(b, h, 0, sp.Sq, dq_acc.data());
      }
    });
    return;
  }

  std::vector<float> deltas(BH * pr.Sq);  // rows of the longest sequence per (b, h)
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> obuf, dobuf;
    for (int64_t bh = begin; bh < end; ++bh)
      io.deltas(bh / pr.H, bh % pr.H, deltas.data() + bh * pr.Sq, obuf, dobuf);
  });
  const int64_t k_blocks = (pr.Sk + kBlockN - 1) / kBlockN;
  at::parallel_for(0, BH * k_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bufs[4], dk_blk(kBlockN * D), dv_blk(kBlockN * D);
    TileScratch w(pr);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / k_blocks, b = bh / pr.H, h = bh % pr.H;
      const Problem sp = pr.sequence(b);
      const int64_t j0 = zigzag(task % k_blocks, k_blocks) * kBlockN;
      if (j0 >= sp.Sk) continue;  // past the end of a shorter packed sequence
      const int64_t n = std::min(kBlockN, sp.Sk - j0);
      int64_t i_begin, i_end;
      rows_seeing(sp, 0, sp.Sq, j0, n, &i_begin, &i_end);
      const HeadGrad g = io.head(b, h, i_begin, std::max<int64_t>(0, i_end - i_begin), j0, n,
                                 deltas.data() + bh * pr.Sq, bufs);
      io.key_block(g, j0, n, w, dk_blk.data(), dv_blk.data(), nullptr);
      io.store_kv(b, h, j0, n, dk_blk.data(), dv_blk.data());
    }
  });
  const int64_t q_blocks = (pr.Sq + kBlockM - 1) / kBlockM;
  at::parallel_for(0, BH * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bufs[4], dq_acc(kBlockM * D);
    TileScratch w(pr);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_blocks, b = bh / pr.H, h = bh % pr.H;
      const Problem sp = pr.sequence(b);
      const int64_t i0 = zigzag(task % q_blocks, q_blocks) * kBlockM;
      if (i0 >= sp.Sq) continue;
      const int64_t m = std::min(kBlockM, sp.Sq - i0);
      // The key blocks (on the grid of the dK/dV tasks) that some row of the block sees.
      const int64_t j_first = sp.lo(i0) / kBlockN * kBlockN, j_end = sp.hi(i0 + m - 1);
      const int64_t j_stop = std::min(sp.Sk, (j_end + kBlockN - 1) / kBlockN * kBlockN);
      const HeadGrad g = io.head(b, h, i0, m, j_first, std::max<int64_t>(0, j_stop - j_first),
                                 deltas.data() + bh * pr.Sq, bufs);
      std::fill(dq_acc.begin(), dq_acc.begin() + m * D, 0.f);
      for (int64_t j0 = j_first; j0 < j_end; j0 += kBlockN) {
        const int64_t n = std::min(kBlockN, sp.Sk - j0);
        int64_t r_begin, r_end;
        rows_seeing(sp, i0, m, j0, n, &r_begin, &r_end);
        if (r_begin >= r_end) continue;
        int64_t c0, c1;
        visible_cols(sp, r_begin, r_end - r_begin, j0, n, &c0, &c1);
        if (c0 >= c1) continue;
        tile_grads(pr, g, r_begin, r_end - r_begin, c0, c1 - c0, w);
        gemm(pr.blas, false, false, r_end - r_begin, D, c1 - c0, pr.scale, w.dp.data(), kBlockN,
             g.k(c0), g.ldk, 1.f, dq_acc.data() + (r_begin - i0) * D, D);
      }
      io.store_q(b, h, i0, m, dq_acc.data());
    }
  });
}

// A (B, H, S, D) tensor stored as (B, S, H, D), the layout of the outputs and gradients of
// dense attention (the contract in fastattn/ops/attention/reference.py): a model's
// out.transpose(1, 2).reshape(B, S, H * D) is then a view, and so are the reshapes that take
// dq, dk, dv back to a fused QKV projection's output.
// (empty_strided, not a transposed view: an autograd output that is a view refuses in-place
// changes to it or its reshape.)
at::Tensor empty_bshd(int64_t B, int64_t H, int64_t S, int64_t D, const at::TensorOptions& opts) {
  return at::empty_strided({B, H, S, D}, {S * H * D, D, H * D, 1}, opts);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& bias,
                                                 double scale, int64_t diag, int64_t window_left,
                                                 int64_t window_right, double softcap,
                                                 double dropout_p, int64_t seed) {
  const Problem pr =
      describe(q, k, bias, scale, diag, window_left, window_right, softcap, dropout_p, seed);
  at::Tensor out = empty_bshd(pr.B, pr.H, pr.Sq, pr.D, q.options());
  at::Tensor lse = at::empty({pr.B, pr.H, pr.Sq}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      FA_CHECK(false, "attention_fwd: float64 runs on the reference backend");
    } else {
      forward<scalar_t>(pr, q, k, v, out, lse);
    }
  });
  return {out, lse};
}

}  // namespace cpu
}  // namespace fastattn

namespace fastattn {
namespace cpu {

namespace {

// The backward of either layout: dK, dV are written straight into the outputs, made by
// alloc(heads, options) (heads at dim 1, as q), or with GQA into fp32 partials with a head per
// query head, summed over each group of kv heads into the outputs afterwards.
template <typename Alloc>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(
    const Problem& pr, const char* name, const at::Tensor& dout, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    at::Tensor dq, const Alloc& alloc) {
  const bool grouped = pr.H != pr.Hkv;
  // Few (batch, head) pairs for the threads, and more than one block to split: see backward().
  // The split does 7 block products per tile where the per-head path does 5, so it only pays
  // when the per-head path would leave more than 2 threads in 7 idle: 7 B H < 5 threads.
  const bool split =
      7 * pr.B * pr.H < 5 * at::get_num_threads() && (pr.Sk > kBlockN || pr.Sq > kBlockM);
  const auto fp32 = q.options().dtype(at::kFloat);
  at::Tensor dk = alloc(pr.H, grouped ? fp32 : k.options());
  at::Tensor dv = alloc(pr.H, grouped ? fp32 : v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      FA_CHECK(false, name, ": float64 runs on the reference backend");
    } else {
      backward<scalar_t>(pr, dout, q, k, v, out, lse, dq, dk, dv, grouped, split);
    }
  });
  if (grouped) {
    std::vector<int64_t> shape(dk.sizes().begin(), dk.sizes().end());
    shape[1] = pr.Hkv;
    shape.insert(shape.begin() + 2, pr.H / pr.Hkv);
    dk = alloc(pr.Hkv, k.options()).copy_(dk.view(shape).sum(2));
    dv = alloc(pr.Hkv, v.options()).copy_(dv.view(shape).sum(2));
  }
  return {dq, dk, dv};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& bias,
    double scale, int64_t diag, int64_t window_left, int64_t window_right, double softcap,
    double dropout_p, int64_t seed) {
  const Problem pr =
      describe(q, k, bias, scale, diag, window_left, window_right, softcap, dropout_p, seed);
  return run_backward(pr, "attention_bwd", dout, q, k, v, out, lse,
                      empty_bshd(pr.B, pr.H, pr.Sq, pr.D, q.options()),
                      [&](int64_t heads, const at::TensorOptions& opts) {
                        return empty_bshd(pr.B, heads, pr.Sk, pr.D, opts);
                      });
}

// ---- packed sequences (varlen) ---------------------------------------------------------------

namespace {

// The longest sequence of prefix sums cu (N + 1,): sizes the task grid and the per-task buffers
// (max_seqlen, validated by the binding to be at least this, may be a loose upper bound).
int64_t longest(const at::Tensor& cu) {
  const int32_t* c = cu.data_ptr<int32_t>();
  int64_t mx = 0;
  for (int64_t b = 0; b + 1 < cu.numel(); ++b) mx = std::max<int64_t>(mx, c[b + 1] - c[b]);
  return mx;
}

// Batch entry b = sequence b; causal is a window (-1, 0) about each sequence's own diagonal.
Problem describe_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
                        const at::Tensor& cu_seqlens_k, double scale, bool causal) {
  Problem p;
  p.blas = use_blas();
  p.B = cu_seqlens_q.numel() - 1;
  p.H = q.size(1);
  p.Hkv = k.size(1);
  p.D = q.size(2);
  p.scale = static_cast<float>(scale);
  p.softcap = 0.f;
  p.diag = 0;  // per sequence: Problem::sequence
  p.window_left = -1;
  p.window_right = causal ? 0 : -1;
  p.Sq = longest(cu_seqlens_q);
  p.Sk = longest(cu_seqlens_k);
  p.cu_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_k = cu_seqlens_k.data_ptr<int32_t>();
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t /*max_seqlen_q*/, int64_t /*max_seqlen_k*/,
    double scale, bool causal) {
  const Problem pr = describe_varlen(q, k, cu_seqlens_q, cu_seqlens_k, scale, causal);
  // Every token belongs to one sequence, so every row of out and lse gets written.
  at::Tensor out = at::empty({q.size(0), pr.H, pr.D}, q.options());
  at::Tensor lse = at::empty({pr.H, q.size(0)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "varlen_attention_fwd", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      FA_CHECK(false, "varlen_attention_fwd: float64 runs on the reference backend");
    } else {
      forward<scalar_t>(pr, q, k, v, out, lse);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t /*max_seqlen_q*/, int64_t /*max_seqlen_k*/,
    double scale, bool causal) {
  const Problem pr = describe_varlen(q, k, cu_seqlens_q, cu_seqlens_k, scale, causal);
  return run_backward(pr, "varlen_attention_bwd", dout, q, k, v, out, lse,
                      at::empty({q.size(0), pr.H, pr.D}, q.options()),
                      [&](int64_t heads, const at::TensorOptions& opts) {
                        return at::empty({k.size(0), heads, pr.D}, opts);
                      });
}

}  // namespace cpu
}  // namespace fastattn
