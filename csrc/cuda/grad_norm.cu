// CUDA kernels of the total gradient norm and the clipping scale: grad_norm, scale_grads_.
// Math and conventions: fastattn/ops/grad_norm/reference.py. Inputs are validated here with
// FA_CHECK (bindings.cpp only forwards), so the binding file gains just its m.def lines.
//
// Multi-tensor apply: every tensor is cut into chunks of kChunk elements; a launch takes a
// table of up to kMaxTensors tensor pointers and kMaxBlocks (tensor, chunk) entries, passed by
// value in the kernel parameters (~2.5 KB, under the classic 4 KB limit), and runs one block per
// chunk. Longer lists are cut into several launches; no host-to-device copy is needed, so
// neither op ever synchronises the host with the stream.
//
// Norm: block b reduces its chunk (16-byte loads, fp32 math: sum of x*x or max |x|) with the
// fixed-order xor butterflies of common.cuh and writes partials[b]; then one 1024-thread block
// adds the partials in fp64 in a fixed order (thread t takes t, t + 1024, ...) and writes
// sqrt(sum) as fp32. No atomics: bitwise reproducible. Traffic: 4 B per fp32 element (2 B
// fp16/bf16) + 4 B per 64K-element chunk.
// The inf-norm is a max over magnitude bits (fp32 pattern, sign cleared, as unsigned): IEEE
// patterns order like magnitudes and NaN sorts above inf, so NaN propagates, exactly.
//
// Scale: the same table; each block reads total_norm from device memory, computes
// coef = min(max_norm / (total_norm + 1e-6), 1) in fp32 (as torch: reciprocal, then times
// max_norm) and rewrites its chunk: 8 B per fp32 element.
// Indexing: chunk offsets are int64 (tensors may exceed 2^31 elements); within a chunk, int.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common.cuh"
#include "ops.h"

namespace fastattn {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 1 << 16;  // elements per block: 256 KB of fp32, 32 vectors/thread
constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;
constexpr int kUnroll = 4;            // 16-byte loads in flight per thread
constexpr int kFinalThreads = 1024;

struct ChunkTable {
  void* ptr[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk[kMaxBlocks];       // chunk index within its tensor
  uint8_t tensor[kMaxBlocks];      // slot in ptr / numel
};
static_assert(sizeof(ChunkTable) <= 4000, "kernel parameters must stay under 4 KB");

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
    partials_kernel(const ChunkTable table, float* __restrict__ partials, int64_t first_block) {
  using dev::Pack16;
  constexpr int kN = Pack16<T>::kN;
  const int slot = table.tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.chunk[blockIdx.x]) * kChunk;
  const int64_t left = table.numel[slot] - start;
  const int n = static_cast<int>(left < kChunk ? left : kChunk);
  const T* __restrict__ x = static_cast<const T*>(table.ptr[slot]) + start;

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
    if (threadIdx.x == 0) partials[first_block + blockIdx.x] = __uint_as_float(m);
  } else {
    const float s = dev::block_allreduce_sum(sum, smem_f);
    if (threadIdx.x == 0) partials[first_block + blockIdx.x] = s;
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
    scale_kernel(const ChunkTable table, const float* __restrict__ total_norm, float max_norm) {
  using dev::Pack16;
  constexpr int kN = Pack16<T>::kN;
  const int slot = table.tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.chunk[blockIdx.x]) * kChunk;
  const int64_t left = table.numel[slot] - start;
  const int n = static_cast<int>(left < kChunk ? left : kChunk);
  T* __restrict__ x = static_cast<T*>(table.ptr[slot]) + start;
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

// Walks the (tensor, chunk) list of `tensors`, filling tables and calling launch(table,
// nblocks, first_block) whenever one is full. Returns the total number of chunks.
template <typename Launch>
int64_t for_each_table(const std::vector<at::Tensor>& tensors, Launch launch) {
  ChunkTable table;
  int nt = 0, nb = 0;
  int64_t done = 0;
  auto flush = [&]() {
    launch(table, nb, done);
    done += nb;
    nb = 0;
  };
  for (const at::Tensor& t : tensors) {
    const int64_t numel = t.numel();
    if (numel == 0) continue;
    if (nt == kMaxTensors) {  // no free slot; every slot holds >= 1 pending chunk, so nb > 0
      flush();
      nt = 0;
    }
    table.ptr[nt] = t.data_ptr();
    table.numel[nt] = numel;
    const int64_t nchunks = (numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < nchunks; ++c) {
      if (nb == kMaxBlocks) {  // full: launch, and carry only this tensor over, into slot 0
        flush();
        table.ptr[0] = table.ptr[nt];
        table.numel[0] = numel;
        nt = 0;
      }
      table.tensor[nb] = static_cast<uint8_t>(nt);
      table.chunk[nb] = static_cast<int32_t>(c);
      ++nb;
    }
    ++nt;
  }
  if (nb > 0) flush();
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
  for_each_table(tensors, [&](const ChunkTable& table, int nb, int64_t first) {
    if (inf_norm) {
      partials_kernel<T, true><<<nb, kThreads, 0, stream>>>(table, partials, first);
    } else {
      partials_kernel<T, false><<<nb, kThreads, 0, stream>>>(table, partials, first);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
void launch_scale(const std::vector<at::Tensor>& tensors, const float* norm, float max_norm,
                  cudaStream_t stream) {
  for_each_table(tensors, [&](const ChunkTable& table, int nb, int64_t) {
    scale_kernel<T><<<nb, kThreads, 0, stream>>>(table, norm, max_norm);
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
