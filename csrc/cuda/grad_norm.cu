// CUDA kernels of the total gradient norm and the clipping scale: grad_norm, scale_grads_.
// Math and conventions: fastattn/ops/grad_norm/reference.py. Inputs are validated here with
// FA_CHECK (bindings.cpp only forwards), so the binding file gains just its m.def lines.
//
// Multi-tensor apply: every tensor is cut into chunks of kChunk elements, one block per chunk.
// A launch takes up to kMaxTensors whole tensors: their pointers, sizes and first block
// numbers, passed by value in the kernel parameters (~2.6 KB, under the classic 4 KB limit, read
// through __grid_constant__); a block finds its tensor by a binary search of the first block
// numbers. No host-to-device copy is needed, so neither op ever synchronises the host with the
// stream.
// Why not a table of (tensor, chunk) entries, at most 320 a launch (apex's and torch's layout,
// this file's until 2026-12-01): on the H200 (2026-11-30) that ran clip_grad_norm_ over 1.07B
// parameters in 200 tensors at 3.58 ms in fp32 and 1.99 ms in bf16, 84% and 76% of the copy
// bandwidth: 104 launches of 320 blocks (0.6 of the 528 that fit at 4 blocks an SM), and the
// time above the bytes' (at the copy rate) comes to ~4.5 us a launch, the machine draining one
// launch and filling the next. With whole tensors the same call is 2 launches a pass.
//
// Norm: block b reduces its chunk (16-byte loads, fp32 math: sum of x*x or max |x|) with the
// fixed-order xor butterflies of common.cuh and writes partials[b] (b: the chunk's number in
// the whole call, tensor by tensor); then one 1024-thread block
// adds the partials in fp64 in a fixed order (thread t takes t, t + 1024, ...) and writes
// sqrt(sum) as fp32. No atomics: bitwise reproducible. Traffic: 4 B per fp32 element (2 B
// fp16/bf16) + 4 B per 64K-element chunk.
// The inf-norm is a max over magnitude bits (fp32 pattern, sign cleared, as unsigned): IEEE
// patterns order like magnitudes and NaN sorts above inf, so NaN propagates, exactly.
//
// Scale: the same batches; each block reads total_norm from device memory, computes
// coef = min(max_norm / (total_norm + 1e-6), 1) in fp32 (as torch: reciprocal, then times
// max_norm) and rewrites its chunk: 8 B per fp32 element.
// Indexing: chunk offsets are int64 (tensors may exceed 2^31 elements); within a chunk, int.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.cuh"
#include "ops.h"

namespace fastattn {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 1 << 16;  // elements per block: 256 KB of fp32, 32 vectors/thread
constexpr int kMaxTensors = 128;
constexpr int kUnroll = 4;            // 16-byte loads in flight per thread
constexpr int kFinalThreads = 1024;

struct TensorBatch {
  void* ptr[kMaxTensors];
  int64_t numel[kMaxTensors];
  // Blocks [first_block[i], first_block[i + 1]) take the chunks of slot i, in order.
  int32_t first_block[kMaxTensors + 1];
  int32_t ntensors;
};
static_assert(sizeof(TensorBatch) + 32 <= 4000, "kernel parameters must stay under 4 KB");

// The chunk of this block: its tensor's slot, first element and length. The slot is the last
// one whose first block is <= blockIdx.x (first_block strictly increases: every slot holds at
// least one chunk), found by binary search: 7 steps for 128 slots, uniform across the block.
// (adam.cu scans its <= 56 slots instead: the same search there takes its register-bound
// variants from 8 to 16 spilled bytes on sm_90a, nvcc 13.0.)
struct Chunk {
  int slot;
  int64_t start;
  int n;
};
__device__ __forceinline__ Chunk find_chunk(const TensorBatch& batch) {
  const int block = static_cast<int>(blockIdx.x);
  int lo = 0, hi = batch.ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (batch.first_block[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  Chunk c;
  c.slot = lo;
  c.start = static_cast<int64_t>(block - batch.first_block[lo]) * kChunk;
  const int64_t left = batch.numel[lo] - c.start;
  c.n = static_cast<int>(left < kChunk ? left : kChunk);
  return c;
}

struct UMaxOp {
  __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const {
    return a > b ? a : b;
  }
};
struct DSumOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};

// |x| as ordered bits (see the header comment).
__device__ __forceinline__ uint32_t mag_bits(float x) { return __float_as_uint(x) & 0x7fffffffu; }

template <typename T, bool kInf>
__global__ void __launch_bounds__(kThreads)
    partials_kernel(const __grid_constant__ TensorBatch batch, float* __restrict__ partials,
                    int64_t partial_offset) {
  using dev::Pack16;
  constexpr int kN = Pack16<T>::kN;
  const Chunk c = find_chunk(batch);
  const int n = c.n;
  const T* __restrict__ x = static_cast<const T*>(batch.ptr[c.slot]) + c.start;

  float sum = 0.0f;
  uint32_t mx = 0u;
  auto take = [&](float v) {
    if (kInf) {
      const uint32_t b = mag_bits(v);
      mx = b > mx ? b : mx;
    } else {
      sum = fmaf(v, v, sum);
    }
  };
  const int vec_end = (reinterpret_cast<uintptr_t>(x) & 15u) == 0 ? n - n % kN : 0;
  const int nvec = vec_end / kN;
  int v = threadIdx.x;
  for (; v + (kUnroll - 1) * kThreads < nvec; v += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = dev::ld16_stream(x + (v + u * kThreads) * kN);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float f[kN];
      Pack16<T>::unpack(raw[u], f);
#pragma unroll
      for (int j = 0; j < kN; ++j) take(f[j]);
    }
  }
  for (; v < nvec; v += kThreads) {
    float f[kN];
    Pack16<T>::unpack(dev::ld16_stream(x + v * kN), f);
#pragma unroll
    for (int j = 0; j < kN; ++j) take(f[j]);
  }
  for (int i = vec_end + threadIdx.x; i < n; i += kThreads) take(dev::to_float(x[i]));

  __shared__ float smem_f[kThreads / dev::kWarpSize];
  __shared__ uint32_t smem_u[kThreads / dev::kWarpSize];
  if (kInf) {
    const uint32_t m = dev::block_allreduce(mx, UMaxOp{}, 0u, smem_u);
    if (threadIdx.x == 0) partials[partial_offset + blockIdx.x] = __uint_as_float(m);
  } else {
    const float s = dev::block_allreduce_sum(sum, smem_f);
    if (threadIdx.x == 0) partials[partial_offset + blockIdx.x] = s;
  }
}

template <bool kInf>
__global__ void __launch_bounds__(kFinalThreads)
    final_kernel(const float* __restrict__ partials, int64_t n, float* __restrict__ out) {
  __shared__ double smem_d[kFinalThreads / dev::kWarpSize];
  __shared__ uint32_t smem_u[kFinalThreads / dev::kWarpSize];
  if (kInf) {
    uint32_t m = 0u;
    for (int64_t i = threadIdx.x; i < n; i += kFinalThreads) {
      const uint32_t b = __float_as_uint(partials[i]);
      m = b > m ? b : m;
    }
    m = dev::block_allreduce(m, UMaxOp{}, 0u, smem_u);
    if (threadIdx.x == 0) *out = __uint_as_float(m);
  } else {
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kFinalThreads) s += partials[i];
    s = dev::block_allreduce(s, DSumOp{}, 0.0, smem_d);
    if (threadIdx.x == 0) *out = static_cast<float>(sqrt(s));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(const __grid_constant__ TensorBatch batch, const float* __restrict__ total_norm,
                 float max_norm) {
  using dev::Pack16;
  constexpr int kN = Pack16<T>::kN;
  const Chunk c = find_chunk(batch);
  const int n = c.n;
  T* __restrict__ x = static_cast<T*>(batch.ptr[c.slot]) + c.start;
  // torch: clamp((norm + 1e-6).reciprocal() * max_norm, max=1); a NaN stays NaN.
  float coef = __fmul_rn(__frcp_rn(__fadd_rn(*total_norm, 1e-6f)), max_norm);
  coef = coef > 1.0f ? 1.0f : coef;

  const int vec_end = (reinterpret_cast<uintptr_t>(x) & 15u) == 0 ? n - n % kN : 0;
  const int nvec = vec_end / kN;
  int v = threadIdx.x;
  for (; v + (kUnroll - 1) * kThreads < nvec; v += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = dev::ld16(x + (v + u * kThreads) * kN);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float f[kN];
      Pack16<T>::unpack(raw[u], f);
#pragma unroll
      for (int j = 0; j < kN; ++j) f[j] = __fmul_rn(f[j], coef);
      dev::st16_stream(x + (v + u * kThreads) * kN, Pack16<T>::pack(f));
    }
  }
  for (; v < nvec; v += kThreads) {
    float f[kN];
    Pack16<T>::unpack(dev::ld16(x + v * kN), f);
#pragma unroll
    for (int j = 0; j < kN; ++j) f[j] = __fmul_rn(f[j], coef);
    dev::st16_stream(x + v * kN, Pack16<T>::pack(f));
  }
  for (int i = vec_end + threadIdx.x; i < n; i += kThreads) {
    x[i] = dev::from_float<T>(__fmul_rn(dev::to_float(x[i]), coef));
  }
}

// Packs the non-empty `tensors` into batches of whole tensors, calling launch(batch, nblocks,
// partial_offset) for each (partial_offset: the blocks of the earlier batches, where this one's
// partials start). Returns the total number of chunks.
template <typename Launch>
int64_t for_each_batch(const std::vector<at::Tensor>& tensors, Launch launch) {
  constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();  // gridDim.x, int32 math
  TensorBatch batch;
  batch.first_block[0] = 0;
  int nt = 0;
  int64_t done = 0;
  auto flush = [&]() {
    if (nt == 0) return;
    batch.ntensors = nt;
    launch(batch, batch.first_block[nt], done);
    done += batch.first_block[nt];
    nt = 0;
  };
  for (const at::Tensor& t : tensors) {
    const int64_t numel = t.numel();
    if (numel == 0) continue;
    const int64_t chunks = (numel + kChunk - 1) / kChunk;  // < 2^31 (check_list)
    if (nt == kMaxTensors || batch.first_block[nt] + chunks > kMaxBlocks) flush();
    batch.ptr[nt] = t.data_ptr();
    batch.numel[nt] = numel;
    batch.first_block[nt + 1] = static_cast<int32_t>(batch.first_block[nt] + chunks);
    ++nt;
  }
  flush();
  return done;
}

int64_t count_chunks(const std::vector<at::Tensor>& tensors) {
  int64_t n = 0;
  for (const at::Tensor& t : tensors) n += (t.numel() + kChunk - 1) / kChunk;
  return n;
}

void check_list(const std::vector<at::Tensor>& tensors, const char* op) {
  FA_CHECK(!tensors.empty(), op, ": tensors must not be empty");
  const at::Tensor& t0 = tensors[0];
  FA_CHECK(t0.defined() && t0.is_cuda(), op, ": tensors[0] must be a CUDA tensor");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    FA_CHECK(t.defined(), op, ": tensors[", i, "] is an undefined tensor");
    FA_CHECK(t.layout() == at::kStrided, op, ": tensors[", i, "] must be dense (strided), "
             "got layout ", t.layout());
    FA_CHECK(t.device() == t0.device(), op, ": tensors[", i, "] is on ", t.device(),
             ", tensors[0] on ", t0.device(), ": one device per call");
    const auto dt = t.scalar_type();
    FA_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": tensors[", i,
             "] must be float32, float16 or bfloat16, got ", dt);
    FA_CHECK(dt == t0.scalar_type(), op, ": all tensors must share one dtype (tensors[0] is ",
             t0.scalar_type(), "), tensors[", i, "] is ", dt);
    FA_CHECK(t.is_contiguous(), op, ": tensors[", i, "] must be contiguous, got strides ",
             t.strides());
    FA_CHECK((t.numel() + kChunk - 1) / kChunk < (int64_t(1) << 31), op, ": tensors[", i,
             "] is too large (", t.numel(), " elements)");
  }
}

template <typename T>
void launch_partials(const std::vector<at::Tensor>& tensors, bool inf_norm, float* partials,
                     cudaStream_t stream) {
  for_each_batch(tensors, [&](const TensorBatch& batch, int nb, int64_t first) {
    if (inf_norm) {
      partials_kernel<T, true><<<nb, kThreads, 0, stream>>>(batch, partials, first);
    } else {
      partials_kernel<T, false><<<nb, kThreads, 0, stream>>>(batch, partials, first);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
void launch_scale(const std::vector<at::Tensor>& tensors, const float* norm, float max_norm,
                  cudaStream_t stream) {
  for_each_batch(tensors, [&](const TensorBatch& batch, int nb, int64_t) {
    scale_kernel<T><<<nb, kThreads, 0, stream>>>(batch, norm, max_norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor grad_norm_cuda(const std::vector<at::Tensor>& tensors, double norm_type) {
  check_list(tensors, "grad_norm");
  const bool inf_norm = std::isinf(norm_type) && norm_type > 0;
  FA_CHECK(inf_norm || norm_type == 2.0, "grad_norm: the CUDA kernel supports norm_type 2 "
           "and inf, got ", norm_type, " (other p run the reference)");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = tensors[0].options().dtype(at::kFloat);
  at::Tensor out = at::zeros({}, opts);
  const int64_t nchunks = count_chunks(tensors);
  if (nchunks == 0) return out;
  at::Tensor partials = at::empty({nchunks}, opts);
  float* p = partials.data_ptr<float>();
  switch (tensors[0].scalar_type()) {
    case at::kHalf:
      launch_partials<__half>(tensors, inf_norm, p, stream);
      break;
    case at::kBFloat16:
      launch_partials<__nv_bfloat16>(tensors, inf_norm, p, stream);
      break;
    default:
      launch_partials<float>(tensors, inf_norm, p, stream);
  }
  if (inf_norm) {
    final_kernel<true><<<1, kFinalThreads, 0, stream>>>(p, nchunks, out.data_ptr<float>());
  } else {
    final_kernel<false><<<1, kFinalThreads, 0, stream>>>(p, nchunks, out.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void scale_grads_cuda(const std::vector<at::Tensor>& tensors, double max_norm,
                      const at::Tensor& total_norm) {
  if (tensors.empty()) return;
  check_list(tensors, "scale_grads_");
  FA_CHECK(total_norm.defined() && total_norm.device() == tensors[0].device() &&
                  total_norm.scalar_type() == at::kFloat && total_norm.numel() == 1,
              "scale_grads_: total_norm must be a float32 one-element tensor on ",
              tensors[0].device());
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* norm = total_norm.data_ptr<float>();
  const float m = static_cast<float>(max_norm);
  switch (tensors[0].scalar_type()) {
    case at::kHalf:
      launch_scale<__half>(tensors, norm, m, stream);
      break;
    case at::kBFloat16:
      launch_scale<__nv_bfloat16>(tensors, norm, m, stream);
      break;
    default:
      launch_scale<float>(tensors, norm, m, stream);
  }
}

}  // namespace fastattn
