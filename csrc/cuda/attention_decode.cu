// CUDA KV-cache decode attention (flash-decoding). Contract: "Decode" in the attention spec
// (fastattn/ops/attention/triton_decode.py is the Triton twin, same algorithm and workspace):
// q (B, H, Sq, D), k_cache / v_cache (B, Hkv, S_max, D), cache_seqlens int32 (B,); query i of
// batch b sees position j iff j < L_b and j <= i + L_b - Sq, L_b = clamp(seqlens[b], 0, S_max).
//
// Kernel 1, decode_split_kernel: one block per (b * Hkv + kv head, split, row block). The
// M = (H / Hkv) * Sq query rows sharing a kv head (row r = g * Sq + i, query head hkv * G + g)
// are packed kRows at a time into one block, so a K/V row is fetched once for all of them
// (M <= 8, i.e. every MHA/GQA-8 decode with Sq = 1, reads the cache exactly once). The block
// walks its slice of [0, L_b) (L_b split evenly in whole kKeyStep chunks) as groups of
// kLanes threads per key: a lane holds 8 (fp32: 4..8) head-dim elements of every row's q, loads
// the same slice of K and V with 16-byte loads, dots them (one xor-butterfly over the group),
// and keeps per row an online softmax in the exp2 domain:
//     s2 = q.k * scale * log2 e,  m = running max,  l = sum exp2(s2 - m),  acc = sum exp2(s2 - m) v
// rescaled by exp2(m_old - m_new) once per kUnroll keys. At the end the groups of the block are
// merged through shared memory and the split writes acc / l and lse = (m + log2 l) * ln 2
// (fp32; 0 and -inf when it saw nothing) into the workspace.
// Kernel 2, decode_combine_kernel: one warp per query row merges its splits,
//     lse = log sum_s exp(lse_s),  out = sum_s exp(lse_s - lse) out_s,
// and writes out in q's dtype and lse (0 and -inf when every split is empty).
//
// Memory traffic. Split kernel: reads 2 * L_b * D * e bytes of cache per (b, kv head) and row
// block (once in total when M <= kRows), M * D * e of q, writes splits * M * (D + 1) * 4 bytes
// of partials. Combine: reads the partials back (from L2: they were just written) and writes
// B * H * Sq * (D * e + 4). With >= 256 positions per split the partials are <= ~1/64 of the
// cache bytes (bf16, M = 8), so the cost is the cache read at HBM speed.
//
// Why these sizes. Decode is memory bound; an H200 needs ~4.8 TB/s * ~0.7 us ~ 3.4 MB of loads
// in flight, ~26 KB per SM. A 128-thread block keeps kUnroll = 4 keys x (K + V) x 16 B = 128 B
// per thread, 16 KB per block, in flight, and at <= 128 registers per thread (one row per
// block) four blocks are resident per SM: 64 KB in flight (see min_blocks). The grid is
// B * Hkv * row blocks * splits blocks; B * Hkv alone (e.g. 8 for batch 1, GQA-8) leaves most
// SMs idle, so the split count is raised until there are ~4 blocks per SM (one full wave at
// the residency above), but never below 256 cache positions per split, and at most kMaxSplits.
//
// Indexing: every offset into q, caches, partials and outputs is int64.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "ops.h"

namespace fastattn {
namespace {

using dev::from_float;
using dev::kLog2e;
using dev::kWarpSize;
using dev::ld16;
using dev::neg_inf;
using dev::Pack16;
using dev::to_float;

constexpr int kThreads = 128;
constexpr int kUnroll = 4;
constexpr int kMinSplitLen = 256;
constexpr int kMaxSplits = 128;
constexpr float kLn2 = 0.6931471805599453f;

// Threads per key and 16-byte vectors per thread for a head-dim bucket kD: up to a warp per
// key, so a lane holds kD / kLanes <= 8 elements per row whatever the dtype (registers:
// 2 * kRows * 8 floats for q and acc).
template <typename T, int kD>
struct Layout {
  static constexpr int kN = Pack16<T>::kN;                // elements per 16-byte vector
  static constexpr int kVecsRow = kD / kN;                // vectors in a kD row
  static constexpr int kLanes = kVecsRow < kWarpSize ? kVecsRow : kWarpSize;
  static constexpr int kVecs = kVecsRow / kLanes;         // vectors per lane (1 or 2)
  static constexpr int kElems = kVecs * kN;               // elements per lane per row
  static constexpr int kGroups = kThreads / kLanes;       // keys in flight per unroll step
  static constexpr int kKeyStep = kGroups * kUnroll;      // keys per loop iteration
  static_assert(kVecsRow % kLanes == 0 && kElems <= 8, "head-dim bucket layout");
};

template <typename T>
struct SplitArgs {
  const T* q;
  const T* k;
  const T* v;
  const int* seqlens;
  float* o_part;    // (B * Hkv, splits, M, D)
  float* lse_part;  // (B * Hkv, splits, M)
  int64_t sqb, sqh, sqs, skb, skh, sks, svb, svh, svs;
  int Hkv, G, Sq, S_max, M, D, splits;
  float qk_scale;  // scale * log2 e
};

// Resident blocks per SM asked of the register allocator. 1 row: 4 blocks (<= 128 registers,
// 64 KB of loads in flight per SM). q and acc take 2 * kRows * 8 floats per thread, so 4 rows
// get 3 blocks (<= 168 registers; 4 blocks spilled on sm_80 and on fp32 D = 256) and 8 rows
// 2 blocks (<= 255 registers, 32 KB in flight per SM: the minimum that still keeps HBM busy).
template <int kRows>
constexpr int min_blocks() { return kRows == 1 ? 4 : kRows == 4 ? 3 : 2; }

template <typename T, int kD, int kRows>
__global__ void __launch_bounds__(kThreads, min_blocks<kRows>()) decode_split_kernel(const SplitArgs<T> a) {
  using Lay = Layout<T, kD>;
  constexpr int kN = Lay::kN;
  constexpr int kLanes = Lay::kLanes;
  constexpr int kVecs = Lay::kVecs;
  constexpr int kElems = Lay::kElems;
  constexpr int kGroups = Lay::kGroups;

  const int bh = blockIdx.x;
  const int split = blockIdx.y;
  const int row0 = blockIdx.z * kRows;
  const int b = bh / a.Hkv;
  const int hkv = bh % a.Hkv;
  const int lane = threadIdx.x % kLanes;
  const int grp = threadIdx.x / kLanes;

  int L = a.seqlens[b];
  L = min(max(L, 0), a.S_max);
  const int n_chunks = (L + Lay::kKeyStep - 1) / Lay::kKeyStep;
  const int per_split = (n_chunks + a.splits - 1) / a.splits;
  const int start = min(split * per_split * Lay::kKeyStep, L);
  const int end = min(start + per_split * Lay::kKeyStep, L);

  // q slice of every row, pre-scaled; rows past M get last = -1 (see nothing) and q = 0.
  float q[kRows][kElems];
  int last[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = row0 + r;
    const bool ok = row < a.M;
    const int g = ok ? row / a.Sq : 0;
    const int i = ok ? row % a.Sq : 0;
    last[r] = ok ? i + L - a.Sq : -1;
    const T* qr = a.q + static_cast<int64_t>(b) * a.sqb +
                  static_cast<int64_t>(hkv * a.G + g) * a.sqh + static_cast<int64_t>(i) * a.sqs;
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const int d0 = (lane + v * kLanes) * kN;
#pragma unroll
      for (int e = 0; e < kN; ++e) {
        // q is tiny next to the cache: scalar loads, so q needs no 16-byte alignment.
        const float x = (ok && d0 < a.D) ? to_float(qr[d0 + e]) : 0.0f;
        q[r][v * kN + e] = x * a.qk_scale;
      }
    }
  }

  float m[kRows], l[kRows], acc[kRows][kElems];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = neg_inf();
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[r][e] = 0.0f;
  }

  const T* kbase = a.k + static_cast<int64_t>(b) * a.skb + static_cast<int64_t>(hkv) * a.skh;
  const T* vbase = a.v + static_cast<int64_t>(b) * a.svb + static_cast<int64_t>(hkv) * a.svh;

  // Uniform trip count over the block, so every lane of a warp reaches the shuffles.
  for (int base = start; base < end; base += Lay::kKeyStep) {
    uint4 kr[kUnroll][kVecs], vr[kUnroll][kVecs];
    // All loads of the step are issued before any is used (kUnroll * kVecs * 2 in flight).
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + grp + u * kGroups;
#pragma unroll
      for (int v = 0; v < kVecs; ++v) {
        const int d0 = (lane + v * kLanes) * kN;
        if (j < end && d0 < a.D) {
          kr[u][v] = ld16(kbase + static_cast<int64_t>(j) * a.sks + d0);
          vr[u][v] = ld16(vbase + static_cast<int64_t>(j) * a.svs + d0);
        } else {
          kr[u][v] = make_uint4(0u, 0u, 0u, 0u);  // zero bits are 0.0 in every dtype
          vr[u][v] = make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
    float s[kUnroll][kRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[kElems];
#pragma unroll
      for (int v = 0; v < kVecs; ++v) {
        float t[kN];
        Pack16<T>::unpack(kr[u][v], t);
#pragma unroll
        for (int e = 0; e < kN; ++e) kf[v * kN + e] = t[e];
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < kElems; ++e) dot = fmaf(q[r][e], kf[e], dot);
        // Groups are kLanes-aligned inside the warp, so xor offsets < kLanes stay in the group.
#pragma unroll
        for (int off = kLanes / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const int j = base + grp + u * kGroups;
        s[u][r] = (j < end && j <= last[r]) ? dot : neg_inf();
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float mx = s[0][r];
#pragma unroll
      for (int u = 1; u < kUnroll; ++u) mx = fmaxf(mx, s[u][r]);
      const float m_new = fmaxf(m[r], mx);
      // Pivot 0 while the row has seen nothing: exp2(-inf - 0) = 0, never exp2(-inf + inf).
      const float pivot = m_new == neg_inf() ? 0.0f : m_new;
      const float alpha = exp2f(m[r] - pivot);
      l[r] *= alpha;
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[r][e] *= alpha;
      m[r] = m_new;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float p = exp2f(s[u][r] - pivot);
        l[r] += p;
#pragma unroll
        for (int v = 0; v < kVecs; ++v) {
          float t[kN];
          Pack16<T>::unpack(vr[u][v], t);
#pragma unroll
          for (int e = 0; e < kN; ++e) acc[r][v * kN + e] = fmaf(p, t[e], acc[r][v * kN + e]);
        }
      }
    }
  }

  // Merge the kGroups partial states: global max per row, then each thread sums a slice of the
  // rescaled accumulators over the groups (fixed order: deterministic). 32 KB at kRows = 8.
  __shared__ float sm_m[kGroups][kRows];
  __shared__ float sm_l[kGroups][kRows];
  __shared__ float sm_acc[kGroups][kRows][kD];
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) sm_m[grp][r] = m[r];
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float mg = neg_inf();
    for (int gi = 0; gi < kGroups; ++gi) mg = fmaxf(mg, sm_m[gi][r]);
    const float pivot = mg == neg_inf() ? 0.0f : mg;
    const float alpha = exp2f(m[r] - pivot);
    if (lane == 0) sm_l[grp][r] = l[r] * alpha;
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const int d0 = (lane + v * kLanes) * kN;
#pragma unroll
      for (int e = 0; e < kN; ++e) sm_acc[grp][r][d0 + e] = acc[r][v * kN + e] * alpha;
    }
    m[r] = mg;  // now the block-wide max (same in every thread)
  }
  __syncthreads();

  const int64_t part = (static_cast<int64_t>(bh) * a.splits + split) * a.M;
  for (int idx = threadIdx.x; idx < kRows * kD; idx += kThreads) {
    const int r = idx / kD;
    const int d = idx % kD;
    const int row = row0 + r;
    if (row >= a.M || d >= a.D) continue;
    float lsum = 0.0f, o = 0.0f;
    for (int gi = 0; gi < kGroups; ++gi) {
      lsum += sm_l[gi][r];
      o += sm_acc[gi][r][d];
    }
    // "Saw a finite score" is l != 0, not l > 0: a NaN in q or a visible k/v row must reach
    // the output (as in PyTorch), not pass for an empty split.
    const bool has = !(lsum == 0.0f);
    a.o_part[(part + row) * a.D + d] = has ? o / lsum : 0.0f;
    if (d == 0) {
      float mr = neg_inf();
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) mr = rr == r ? m[rr] : mr;
      a.lse_part[part + row] = has ? (mr + log2f(lsum)) * kLn2 : neg_inf();
    }
  }
}

template <typename T>
struct CombineArgs {
  const float* o_part;
  const float* lse_part;
  T* out;      // (B, H, Sq, D) contiguous
  float* lse;  // (B, H, Sq) contiguous
  int64_t rows;  // B * Hkv * M
  int Hkv, G, Sq, M, D, splits;
};

constexpr int kCombineWarps = 4;

template <typename T>
__global__ void __launch_bounds__(kCombineWarps * kWarpSize)
    decode_combine_kernel(const CombineArgs<T> a) {
  __shared__ float sm_w[kCombineWarps][kMaxSplits];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp;
  if (row >= a.rows) return;  // whole warp leaves together: no barrier below
  const int64_t bh = row / a.M;
  const int r = static_cast<int>(row % a.M);
  const int64_t b = bh / a.Hkv;
  const int hkv = static_cast<int>(bh % a.Hkv);
  const int h = hkv * a.G + r / a.Sq;
  const int i = r % a.Sq;
  const int64_t part0 = bh * a.splits * a.M + r;  // + s * M for split s

  float mx = neg_inf();
  for (int s = lane; s < a.splits; s += kWarpSize) mx = fmaxf(mx, a.lse_part[part0 + s * a.M]);
  mx = dev::warp_allreduce(mx, dev::MaxOp{});
  const float pivot = mx == neg_inf() ? 0.0f : mx;
  float wsum = 0.0f;
  for (int s = lane; s < a.splits; s += kWarpSize) {
    const float w = exp2f((a.lse_part[part0 + s * a.M] - pivot) * kLog2e);
    sm_w[warp][s] = w;
    wsum += w;
  }
  wsum = dev::warp_allreduce(wsum, dev::SumOp{});
  __syncwarp();
  const bool has = !(wsum == 0.0f);  // NaN partials propagate (see the split kernel)
  const float inv = has ? 1.0f / wsum : 0.0f;

  const int64_t orow = (b * (static_cast<int64_t>(a.Hkv) * a.G) + h) * a.Sq + i;
  for (int d0 = lane * 4; d0 < a.D; d0 += kWarpSize * 4) {  // D % 8 == 0: whole float4s
    float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int s = 0; s < a.splits; ++s) {
      const float w = sm_w[warp][s];
      if (w == 0.0f) continue;  // empty split: its partial is 0 anyway, skip the load
      const float4 x =
          *reinterpret_cast<const float4*>(a.o_part + (part0 + static_cast<int64_t>(s) * a.M) * a.D + d0);
      o[0] = fmaf(w, x.x, o[0]);
      o[1] = fmaf(w, x.y, o[1]);
      o[2] = fmaf(w, x.z, o[2]);
      o[3] = fmaf(w, x.w, o[3]);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) a.out[orow * a.D + d0 + e] = from_float<T>(o[e] * inv);
  }
  if (lane == 0) a.lse[orow] = has ? pivot + logf(wsum) : neg_inf();
}

int head_dim_bucket(int64_t D) { return D <= 32 ? 32 : D <= 64 ? 64 : D <= 128 ? 128 : 256; }
int rows_per_block(int64_t M) { return M == 1 ? 1 : M <= 4 ? 4 : 8; }

int sm_count() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static int cached[64] = {0};
  if (device < 64 && cached[device] > 0) return cached[device];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cached[device] = n;
  return n;
}

template <typename T, int kD, int kRows>
void launch_split(const SplitArgs<T>& a, int64_t B, int64_t row_blocks, cudaStream_t stream) {
  // x: b * Hkv + kv head (up to 2^31 - 1), y: split (<= kMaxSplits), z: row block (< 65536).
  const dim3 grid(static_cast<unsigned>(B * a.Hkv), static_cast<unsigned>(a.splits),
                  static_cast<unsigned>(row_blocks));
  decode_split_kernel<T, kD, kRows><<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kD>
void launch_split_rows(const SplitArgs<T>& a, int64_t B, cudaStream_t stream) {
  const int rows = rows_per_block(a.M);
  const int64_t row_blocks = (a.M + rows - 1) / rows;
  if (rows == 1) launch_split<T, kD, 1>(a, B, row_blocks, stream);
  if (rows == 4) launch_split<T, kD, 4>(a, B, row_blocks, stream);
  if (rows == 8) launch_split<T, kD, 8>(a, B, row_blocks, stream);
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& cache_seqlens, double scale, const at::Tensor& o_part,
         const at::Tensor& lse_part, const at::Tensor& out, const at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SplitArgs<T> a;
  a.q = static_cast<const T*>(q.const_data_ptr());
  a.k = static_cast<const T*>(k_cache.const_data_ptr());
  a.v = static_cast<const T*>(v_cache.const_data_ptr());
  a.seqlens = cache_seqlens.const_data_ptr<int>();
  a.o_part = o_part.mutable_data_ptr<float>();
  a.lse_part = lse_part.mutable_data_ptr<float>();
  a.sqb = q.stride(0), a.sqh = q.stride(1), a.sqs = q.stride(2);
  a.skb = k_cache.stride(0), a.skh = k_cache.stride(1), a.sks = k_cache.stride(2);
  a.svb = v_cache.stride(0), a.svh = v_cache.stride(1), a.svs = v_cache.stride(2);
  a.Hkv = static_cast<int>(Hkv);
  a.G = static_cast<int>(H / Hkv);
  a.Sq = static_cast<int>(Sq);
  a.S_max = static_cast<int>(k_cache.size(2));
  a.M = static_cast<int>((H / Hkv) * Sq);
  a.D = static_cast<int>(D);
  a.splits = static_cast<int>(lse_part.size(1));
  a.qk_scale = static_cast<float>(scale * 1.4426950408889634);
  switch (head_dim_bucket(D)) {
    case 32: launch_split_rows<T, 32>(a, B, stream); break;
    case 64: launch_split_rows<T, 64>(a, B, stream); break;
    case 128: launch_split_rows<T, 128>(a, B, stream); break;
    default: launch_split_rows<T, 256>(a, B, stream); break;
  }

  CombineArgs<T> c;
  c.o_part = a.o_part;
  c.lse_part = a.lse_part;
  c.out = static_cast<T*>(out.mutable_data_ptr());
  c.lse = lse.mutable_data_ptr<float>();
  c.rows = B * Hkv * a.M;
  c.Hkv = a.Hkv, c.G = a.G, c.Sq = a.Sq, c.M = a.M, c.D = a.D, c.splits = a.splits;
  const int64_t blocks = (c.rows + kCombineWarps - 1) / kCombineWarps;
  decode_combine_kernel<T><<<static_cast<unsigned>(blocks), kCombineWarps * kWarpSize, 0, stream>>>(c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t decode_attention_max_splits() { return kMaxSplits; }

int64_t decode_attention_num_splits(int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t S_max) {
  if (S_max <= 0) return 1;
  const int64_t M = (H / Hkv) * Sq;
  const int rows = rows_per_block(M);
  const int64_t blocks = std::max<int64_t>(1, B * Hkv * ((M + rows - 1) / rows));
  const int64_t want = (4 * static_cast<int64_t>(sm_count()) + blocks - 1) / blocks;
  const int64_t by_len = std::max<int64_t>(1, S_max / kMinSplitLen);
  return std::max<int64_t>(1, std::min<int64_t>({want, by_len, kMaxSplits}));
}

void decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                           double scale, const at::Tensor& o_part, const at::Tensor& lse_part,
                           const at::Tensor& out, const at::Tensor& lse) {
  if (out.numel() == 0) return;
  switch (q.scalar_type()) {
    case at::kFloat:
      run<float>(q, k_cache, v_cache, cache_seqlens, scale, o_part, lse_part, out, lse);
      break;
    case at::kHalf:
      run<__half>(q, k_cache, v_cache, cache_seqlens, scale, o_part, lse_part, out, lse);
      break;
    case at::kBFloat16:
      run<__nv_bfloat16>(q, k_cache, v_cache, cache_seqlens, scale, o_part, lse_part, out, lse);
      break;
    default:
      FA_CHECK(false, "decode_attention: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace fastattn
