// CUDA kernel of the fused Adam/AdamW step (adam_step). The math, the dtype policy and the
// argument conventions are in fastattn/ops/adam/reference.py; this file only says how it is
// computed.
//
// Multi-tensor apply: the host cuts every tensor of the call into chunks of kChunk elements and
// writes the tensors' pointers, sizes and first block numbers into a by-value kernel argument
// (AdamBatch, < 4 KB, read through __grid_constant__ so dynamic indexing does not copy it to
// local memory). One thread block per chunk; a block finds its tensor by scanning the first
// block numbers. A call's non-empty tensors go in launches of up to kMaxTensors whole tensors
// (fewer if their blocks would pass INT32_MAX, the grid's and the block numbers' limit).
//
// Why no per-chunk table (apex's and torch's fused Adam layout, at most 320 chunks a launch):
// on an H200 a launch of 320 blocks is 1.2 waves of the 264 blocks that fit at once, and the
// 56-block tail reads at ~40% of the full machine's rate. A model of that (first wave at the
// copy bandwidth, tail at 56 blocks x 32 KB in flight per ~1 us) gives 168 us per 320-chunk
// fp32 launch; measured 2026-11-29 with that layout: 8.77 ms / 52 launches = 169 us, 81% of
// copy bandwidth. A launch of 56 tensors x ~80 chunks (1B parameters in 200 tensors) is ~17
// waves, one of them a partial tail.
//
// Memory traffic: this is a pure stream. Per element it reads param (or master), grad, m, v
// (+ vmax) and writes param, m, v (+ vmax, master): 16 + 12 = 28 bytes for fp32 everything;
// bf16 params and grads with an fp32 master and fp32 moments: 4+2+4+4 read, 4+2+4+4 written =
// 28 bytes; bf16 params and moments without a master: 8 + 6 = 14 bytes.
// There are ~20 FP32 instructions per element (one IEEE div and one sqrt among them), far
// below what is needed to stall on the ALUs, so the only goal is bytes in flight.
//
// Vector width: kN = 16 / sizeof(narrowest storage dtype) elements per thread and step (4 for
// all-fp32, 8 when params or moments are 16-bit), so the narrowest tensor moves one LDG.128
// per step and wider ones two. With 512 threads and >= 4 independent 16-byte loads per thread
// a block has >= 32 KB in flight; the kernels compile to 56-64 registers (nvcc 13.0; since
// the tensor lookup became a scan, 2 of the 24 variants spill 8 bytes on sm_90a and 1 on
// sm_80: 16-bit params without a master, fp16 with one), so 2 blocks share an SM (__launch_bounds__ caps
// them at 64): >= 64 KB per SM, above the ~36 KB an H200 needs to keep HBM busy (4.8 TB/s *
// ~1 us / 132 SMs). A chunk of 64K elements is 32 (fp32) or 16 steps per thread: long enough
// to amortise the block's prologue (scalar loads, two powf), short enough that a 1M-parameter
// tensor yields 16 blocks.
// Vectors are used for a tensor only when all of its pointers are 16-byte aligned (chunk
// starts are multiples of kN, so every vector is then aligned); otherwise the chunk runs the
// scalar path. The last < kN elements of a chunk always run scalar.
//
// Device-side scalars: step, lr, inv_scale and found_inf are float32 0-dim tensors read by
// every thread (one L1/L2-broadcast load each): nothing is synchronised with the host, so the
// step can be captured in a CUDA graph. Each thread computes the bias corrections itself in
// fp32 as 1 - beta^t = -expm1f(t * ln(beta)), ln(beta) taken on the host in double: 1 -
// powf(beta2, t) would cancel at small t (t = 1, beta2 = 0.999: one ulp of beta^t is 6e-5 of
// the result), expm1f keeps them within ~2 ulps of torch.optim's host-side double values. A
// nonzero found_inf makes every block return before touching memory.
//
// Indexing: element offsets are int64 (chunk index * kChunk); offsets inside a chunk are int.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common.cuh"
#include "ops.h"

namespace fastattn {
namespace {

using dev::from_float;
using dev::ld16;
using dev::Pack16;
using dev::st16;
using dev::to_float;

constexpr int kChunk = 65536;  // elements per block; a multiple of every kN
constexpr int kThreads = 512;
constexpr int kMaxTensors = 56;

// Everything a launch needs to find its chunk. Pointers of absent tensors (vmax without
// amsgrad, master without master weights) are null and never dereferenced.
struct AdamBatch {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  void* exp_avg[kMaxTensors];
  void* exp_avg_sq[kMaxTensors];
  void* max_exp_avg_sq[kMaxTensors];
  float* master[kMaxTensors];
  int64_t numel[kMaxTensors];
  // Blocks [first_block[i], first_block[i + 1]) step the chunks of slot i, in order.
  int32_t first_block[kMaxTensors + 1];
  int32_t ntensors;
};

// Per-call scalars that are not per-tensor.
struct AdamScalars {
  const float* step;
  const float* lr;
  const float* inv_scale;  // null: no gradient unscaling
  const float* found_inf;  // null: never skip
  float log_beta1;         // ln(beta), -inf for beta = 0
  float log_beta2;
  float beta2;
  float one_minus_beta1;   // lerp weight, rounded from double as torch does
  float one_minus_beta2;
  float eps;
  float weight_decay;
  bool decoupled;
  bool maximize;
};

// The launch's argument space is 4 KB; leave room for AdamScalars and padding.
static_assert(sizeof(AdamBatch) + sizeof(AdamScalars) + 64 <= 4096,
              "AdamBatch does not fit the 4 KB kernel parameter space");

// Scalars derived once per thread from the device-side values.
struct StepConsts {
  float inv_scale;
  float lr;
  float step_size;  // lr / (1 - beta1^t)
  float bc2_sqrt;   // sqrt(1 - beta2^t)
  float decay;      // 1 - lr * wd (AdamW)
};

// One element's update, fp32 in and out, in the order of reference.py (torch's single-tensor
// Adam): g' = g * s (* -1); p' = p * (1 - lr wd) or g' += wd p; m' = lerp(m, g', 1 - b1);
// v' = b2 v + (1 - b2) g'^2; vmax' = max(vmax, v'); p' -= step_size * m' / (sqrt(v*) / bc2 +
// eps) with v* = vmax' under amsgrad, v' otherwise.
template <bool kAmsgrad>
__device__ __forceinline__ void adam_update(float& p, float g, float& m, float& v, float& vmax,
                                            const StepConsts& c, const AdamScalars& s) {
  g *= c.inv_scale;
  if (s.maximize) g = -g;
  if (s.weight_decay != 0.0f) {
    if (s.decoupled) {
      p *= c.decay;
    } else {
      g = fmaf(s.weight_decay, p, g);
    }
  }
  // torch.lerp: start + w * (end - start) for |w| < 0.5, else end - (end - start) * (1 - w);
  // the branch is uniform (w is a launch constant).
  const float diff = g - m;
  m = s.one_minus_beta1 < 0.5f ? fmaf(s.one_minus_beta1, diff, m)
                               : fmaf(-diff, 1.0f - s.one_minus_beta1, g);
  v = fmaf(s.beta2, v, s.one_minus_beta2 * g * g);
  float vd = v;
  if (kAmsgrad) {
    // torch.maximum propagates NaN from either side; fmaxf would drop it.
    vmax = (v > vmax || v != v) ? v : vmax;
    vd = vmax;
  }
  const float denom = sqrtf(vd) / c.bc2_sqrt + s.eps;
  p = p - c.step_size * (m / denom);
}

// kN consecutive elements of T from a 16-byte aligned pointer, as fp32.
template <typename T, int kN>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[kN]) {
  constexpr int kPer = Pack16<T>::kN;
  static_assert(kN % kPer == 0, "vector width must be a whole number of 16-byte packs");
#pragma unroll
  for (int j = 0; j < kN / kPer; ++j) {
    float tmp[kPer];
    Pack16<T>::unpack(ld16(ptr + j * kPer), tmp);
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[j * kPer + i] = tmp[i];
  }
}

template <typename T, int kN>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[kN]) {
  constexpr int kPer = Pack16<T>::kN;
  static_assert(kN % kPer == 0, "vector width must be a whole number of 16-byte packs");
#pragma unroll
  for (int j = 0; j < kN / kPer; ++j) {
    float tmp[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) tmp[i] = in[j * kPer + i];
    st16(ptr + j * kPer, Pack16<T>::pack(tmp));
  }
}

// P: param/grad storage, M: moment storage (m, v, vmax); masters are fp32.
template <typename P, typename M, bool kMaster, bool kAmsgrad>
__global__ void __launch_bounds__(kThreads, 2)
    adam_kernel(const __grid_constant__ AdamBatch batch, const AdamScalars s) {
  if (s.found_inf != nullptr && *s.found_inf != 0.0f) return;

  // The last slot whose first block is <= this block (first_block is strictly increasing):
  // a scan of at most kMaxTensors uniform loads from the parameter space, once per block.
  const int block = static_cast<int>(blockIdx.x);
  int slot = 0;
  while (slot + 1 < batch.ntensors && batch.first_block[slot + 1] <= block) ++slot;
  const int64_t start = static_cast<int64_t>(block - batch.first_block[slot]) * kChunk;
  const int64_t left = batch.numel[slot] - start;
  const int n = static_cast<int>(left < kChunk ? left : kChunk);

  P* __restrict__ param = static_cast<P*>(batch.param[slot]) + start;
  const P* __restrict__ grad = static_cast<const P*>(batch.grad[slot]) + start;
  M* __restrict__ exp_avg = static_cast<M*>(batch.exp_avg[slot]) + start;
  M* __restrict__ exp_avg_sq = static_cast<M*>(batch.exp_avg_sq[slot]) + start;
  M* __restrict__ vmax_ptr = kAmsgrad ? static_cast<M*>(batch.max_exp_avg_sq[slot]) + start
                                      : nullptr;
  float* __restrict__ master = kMaster ? batch.master[slot] + start : nullptr;

  StepConsts c;
  {
    const float t = *s.step;
    c.lr = *s.lr;
    c.inv_scale = s.inv_scale != nullptr ? *s.inv_scale : 1.0f;
    c.step_size = c.lr / -expm1f(t * s.log_beta1);
    c.bc2_sqrt = sqrtf(-expm1f(t * s.log_beta2));
    c.decay = 1.0f - c.lr * s.weight_decay;
  }

  // Elements [0, vec_end) go by vectors when every pointer of the tensor is 16-byte aligned.
  constexpr int kN = 16 / (sizeof(P) < sizeof(M) ? sizeof(P) : sizeof(M));
  uintptr_t mis = reinterpret_cast<uintptr_t>(param) | reinterpret_cast<uintptr_t>(grad) |
                  reinterpret_cast<uintptr_t>(exp_avg) | reinterpret_cast<uintptr_t>(exp_avg_sq);
  if (kAmsgrad) mis |= reinterpret_cast<uintptr_t>(vmax_ptr);
  if (kMaster) mis |= reinterpret_cast<uintptr_t>(master);
  const int vec_end = (mis & 15u) == 0 ? n - n % kN : 0;

  for (int i = threadIdx.x * kN; i < vec_end; i += kThreads * kN) {
    float p[kN], g[kN], m[kN], v[kN], vm[kN];
    if (kMaster) {
      load_vec<float, kN>(master + i, p);
    } else {
      load_vec<P, kN>(param + i, p);
    }
    load_vec<P, kN>(grad + i, g);
    load_vec<M, kN>(exp_avg + i, m);
    load_vec<M, kN>(exp_avg_sq + i, v);
    if (kAmsgrad) load_vec<M, kN>(vmax_ptr + i, vm);
#pragma unroll
    for (int j = 0; j < kN; ++j) adam_update<kAmsgrad>(p[j], g[j], m[j], v[j], vm[j], c, s);
    store_vec<P, kN>(param + i, p);
    if (kMaster) store_vec<float, kN>(master + i, p);
    store_vec<M, kN>(exp_avg + i, m);
    store_vec<M, kN>(exp_avg_sq + i, v);
    if (kAmsgrad) store_vec<M, kN>(vmax_ptr + i, vm);
  }

  for (int i = vec_end + threadIdx.x; i < n; i += kThreads) {
    float p = kMaster ? master[i] : to_float(param[i]);
    float m = to_float(exp_avg[i]);
    float v = to_float(exp_avg_sq[i]);
    float vm = kAmsgrad ? to_float(vmax_ptr[i]) : 0.0f;
    adam_update<kAmsgrad>(p, to_float(grad[i]), m, v, vm, c, s);
    param[i] = from_float<P>(p);
    if (kMaster) master[i] = p;
    exp_avg[i] = from_float<M>(m);
    exp_avg_sq[i] = from_float<M>(v);
    if (kAmsgrad) vmax_ptr[i] = from_float<M>(vm);
  }
}

template <typename P, typename M, bool kMaster, bool kAmsgrad>
void launch_all(const AdamLists& t, const AdamScalars& s, cudaStream_t stream) {
  AdamBatch batch;
  int ntensors = 0;
  batch.first_block[0] = 0;
  auto flush = [&]() {
    if (ntensors == 0) return;
    batch.ntensors = ntensors;
    adam_kernel<P, M, kMaster, kAmsgrad>
        <<<batch.first_block[ntensors], kThreads, 0, stream>>>(batch, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ntensors = 0;
  };
  auto set_slot = [&](int slot, size_t i) {
    batch.param[slot] = t.params[i].data_ptr();
    batch.grad[slot] = t.grads[i].data_ptr();
    batch.exp_avg[slot] = t.exp_avgs[i].data_ptr();
    batch.exp_avg_sq[slot] = t.exp_avg_sqs[i].data_ptr();
    batch.max_exp_avg_sq[slot] = kAmsgrad ? t.max_exp_avg_sqs[i].data_ptr() : nullptr;
    batch.master[slot] = kMaster ? t.masters[i].data_ptr<float>() : nullptr;
    batch.numel[slot] = t.params[i].numel();
  };
  constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();  // gridDim.x, int32 math
  for (size_t i = 0; i < t.params.size(); ++i) {
    const int64_t numel = t.params[i].numel();
    if (numel == 0) continue;
    // bindings.cpp caps numel below 2^46, so one tensor has at most 2^30 chunks
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    if (ntensors == kMaxTensors || batch.first_block[ntensors] + chunks > kMaxBlocks) flush();
    set_slot(ntensors, i);
    batch.first_block[ntensors + 1] = static_cast<int32_t>(batch.first_block[ntensors] + chunks);
    ++ntensors;
  }
  flush();
}

template <typename P, typename M>
void dispatch_flags(const AdamLists& t, const AdamScalars& s, bool master, bool amsgrad,
                    cudaStream_t stream) {
  if (master) {
    if (amsgrad) launch_all<P, M, true, true>(t, s, stream);
    else launch_all<P, M, true, false>(t, s, stream);
  } else {
    if (amsgrad) launch_all<P, M, false, true>(t, s, stream);
    else launch_all<P, M, false, false>(t, s, stream);
  }
}

template <typename P>
void dispatch_moments(const AdamLists& t, const AdamScalars& s, bool master, bool amsgrad,
                      cudaStream_t stream) {
  const auto mt = t.exp_avgs[0].scalar_type();
  if (mt == at::kFloat) {
    dispatch_flags<P, float>(t, s, master, amsgrad, stream);
  } else {
    FA_CHECK(mt == at::kBFloat16, "adam_step: moments must be float32 or bfloat16, got ", mt);
    dispatch_flags<P, __nv_bfloat16>(t, s, master, amsgrad, stream);
  }
}

}  // namespace

void adam_step_cuda(const AdamLists& t, const at::Tensor& step, const at::Tensor& lr,
                    double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                    bool amsgrad, bool maximize, const std::optional<at::Tensor>& inv_scale,
                    const std::optional<at::Tensor>& found_inf) {
  if (t.params.empty()) return;
  AdamScalars s;
  s.step = step.data_ptr<float>();
  s.lr = lr.data_ptr<float>();
  s.inv_scale = inv_scale.has_value() ? inv_scale->data_ptr<float>() : nullptr;
  s.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  s.log_beta1 = static_cast<float>(beta1 > 0.0 ? std::log(beta1) : -INFINITY);
  s.log_beta2 = static_cast<float>(beta2 > 0.0 ? std::log(beta2) : -INFINITY);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.weight_decay = static_cast<float>(weight_decay);
  s.decoupled = decoupled;
  s.maximize = maximize;
  const bool master = !t.masters.empty();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (t.params[0].scalar_type()) {
    case at::kFloat:
      dispatch_moments<float>(t, s, master, amsgrad, stream);
      break;
    case at::kHalf:
      dispatch_moments<__half>(t, s, master, amsgrad, stream);
      break;
    case at::kBFloat16:
      dispatch_moments<__nv_bfloat16>(t, s, master, amsgrad, stream);
      break;
    default:
      FA_CHECK(false, "adam_step: params must be float32, float16 or bfloat16, got ",
               t.params[0].scalar_type());
  }
}

}  // namespace fastattn
