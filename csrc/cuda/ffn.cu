// CUDA elementwise kernels of the fused FFN (MLP and SwiGLU): act_fwd, act_bwd, glu_fwd,
// glu_bwd. Contract (activations, derivatives, shapes): the FFN kernel spec; the matmuls around
// them are cuBLAS (ATen). The formulas are those of csrc/cpu/ffn.cpp, which derives them.
//
// One kernel template serves all four: NIn input and NOut output arrays of n elements, each
// element read once and written once (traffic per element, B bytes: act_fwd 2B, act_bwd 4B,
// glu_fwd 3B, glu_bwd 6B) and a few dozen FP32 instructions for it, near an H200's balance of
// ~7 lane instructions per byte of HBM bandwidth (4 x 32 lanes a clock on 132 SMs at 1.98 GHz,
// 4.8 TB/s). Accurate libdevice functions are used instead of the fast intrinsics:
//   expf      (<= 2 ulp, CUDA Math API docs) for sigmoid and exp(-x^2/2); __expf's documented
//             bound is 2 + floor(|1.173 x|) ulp (ex2.approx of a rounded x * log2 e), ~90 ulp
//             at |x| = 80;
//   Phi in gelu: normcdff (<= 5 ulp) for float32 results; 0.5 (1 + erff(x / sqrt 2)) alone would
//             cancel to 0 for x << 0, where gelu(x) = x Phi(x) is still a normal float. normcdff
//             is not cheap, though: sm_90a SASS of the vector loop has 64 instructions an element
//             for the gelu forward (bf16), twice what its bytes allow on an H200 (50M elements:
//             ~96 us of instructions against ~42 us for its 200 MB). fp16/bf16 results take
//             0.5 + 0.5 erff(x / sqrt 2) where x >= -3 and normcdff below (kErfFrom, kTwoPass):
//             30 instructions an element in that forward when every x >= -3 (~34 on average
//             for N(0, 1) inputs: ~51 us against the bytes' 42); the backward 83 -> 59,
//             GeGLU's forward 66 -> 43 (python -m tests.tools.cuda_sass_loop, and
//             benchmarks/results/sass-ffn-gelu-sm90a-2026-12-01.txt). There the absolute error
//             of Phi is ~6e-8 (half of erff's 2 ulp of a value < 1, and the rounding of
//             x / sqrt 2), ~4.4e-5 of Phi(-3) = 1.35e-3: under a fifth of fp16's half ulp
//             (2.4e-4 to 4.9e-4 relative), bf16's being 8x wider. A warp runs normcdff only
//             when one of its lanes has an x < -3 (0.13% of N(0, 1) values) or a NaN: for that
//             element, or in act_fwd for the vector's such elements after the erff pass.
// exp(-x^2/2) takes x^2 as hi + lo (lo = fma(x, x, -hi)): expf(-hi/2) (1 - lo/2), so the
// rounding of x^2 (16 ulp of the result at |x| ~ 10) does not reach it.
//
// Access: every thread handles 16-byte vectors (4 fp32 or 8 fp16/bf16) in a grid-stride loop,
// loads and stores with the evict-first hint (nothing is re-read); the < kN leftover elements and
// tensors whose pointers are not all 16-byte aligned go through the scalar loop. Indices are
// int64 (T * F can pass 2^31). Launch: 256 threads in one full wave, as many blocks as the
// device holds at once at the kernel's occupancy (grid-stride beyond), on the current stream.
// A fixed count of blocks per SM above what fits (these kernels use 21-48 registers, so 5 to 8
// blocks of 256 fit per SM of 64K registers) would leave the excess as a second wave on a few
// SMs: with the grid-stride loop's even split of the work, 8 blocks on an SM that holds 6 take
// two rounds of one block's time, where one full wave takes 1.33.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>

#include "common.cuh"
#include "ops.h"

namespace fastattn {
namespace {

using dev::from_float;
using dev::ld16_stream;
using dev::Pack16;
using dev::st16_stream;
using dev::to_float;

enum class Act { kGelu, kGeluTanh, kRelu, kRelu2, kSilu };

Act parse_activation(const std::string& name) {
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "relu") return Act::kRelu;
  if (name == "relu2") return Act::kRelu2;
  if (name == "silu") return Act::kSilu;
  FA_CHECK(false, "fastattn._cuda: unknown activation '", name,
           "'; valid: gelu, gelu_tanh, relu, relu2, silu");
}

// s = sigmoid(x); one_minus = 1 - s, as e^-x s where s > 1/2 (no cancellation). x < -88.7:
// e = inf, s = 0, one_minus = 1. NaN stays NaN.
__device__ __forceinline__ float sigmoid(float x, float& one_minus) {
  const float e = expf(-x);
  const float s = 1.0f / (1.0f + e);
  one_minus = e > 1.0f ? 1.0f - s : e * s;
  return s;
}

// Where fp16/bf16 gelu takes Phi from erff (see the header): x >= kErfFrom.
constexpr float kErfFrom = -3.0f;

// How Phi is taken: normcdff (kExact); 0.5 + 0.5 erff(x / sqrt 2), right for x >= kErfFrom only
// (kErf, the first of two passes); or either, by whether x >= kErfFrom (kBranch). fp32
// results take normcdff whatever is asked.
enum class Cdf { kExact, kErf, kBranch };

// Phi(x) = P(N(0, 1) <= x) for a result of type T.
template <typename T, Cdf C>
__device__ __forceinline__ float normal_cdf(float x) {
  constexpr float kSqrtHalf = 0.707106781186547524f;
  if constexpr (sizeof(T) == 2 && C == Cdf::kErf) {
    return fmaf(0.5f, erff(x * kSqrtHalf), 0.5f);
  } else if constexpr (sizeof(T) == 2 && C == Cdf::kBranch) {
    return x >= kErfFrom ? fmaf(0.5f, erff(x * kSqrtHalf), 0.5f) : normcdff(x);  // NaN: normcdff
  } else {
    return normcdff(x);
  }
}

// act(x), and d = act'(x) when With_grad, for a result of type T (C: see normal_cdf).
template <typename T, Act A, bool With_grad, Cdf C>
__device__ __forceinline__ float activation(float x, float& d) {
  if constexpr (A == Act::kGelu) {
    const float cdf = normal_cdf<T, C>(x);
    if constexpr (With_grad) {
      constexpr float kInvSqrt2Pi = 0.398942280401432678f;
      const float x2 = x * x;
      const float x2_lo = fmaf(x, x, -x2);
      const float g = expf(-0.5f * x2) * fmaf(-0.5f, x2_lo, 1.0f);
      d = cdf + x * (g * kInvSqrt2Pi);
    }
    return x * cdf;
  } else if constexpr (A == Act::kGeluTanh) {
    // 0.5 (1 + tanh(z / 2)) = sigmoid(z), z = 2 sqrt(2/pi) (x + 0.044715 x^3)
    constexpr float k2 = 2 * 0.797884560802865356f;
    constexpr float c = 0.044715f;
    const float x2 = x * x;
    float om;
    const float s = sigmoid(x * (k2 + (k2 * c) * x2), om);
    if constexpr (With_grad) d = s + x * (s * om) * (k2 + (3 * k2 * c) * x2);
    return x * s;
  } else if constexpr (A == Act::kRelu) {
    if constexpr (With_grad) d = x <= 0.0f ? 0.0f : 1.0f;  // 0 at 0, 1 at NaN (as torch)
    return 0.0f > x ? 0.0f : x;                            // NaN propagates
  } else if constexpr (A == Act::kRelu2) {
    const float r = 0.0f > x ? 0.0f : x;
    if constexpr (With_grad) d = 2.0f * r;
    return r * r;
  } else {  // silu
    float om;
    const float s = sigmoid(x, om);
    if constexpr (With_grad) d = s * (1.0f + x * om);
    return x * s;
  }
}

enum class Kind { kActFwd, kActBwd, kGluFwd, kGluBwd };

template <Kind K>
struct Arity;
template <>
struct Arity<Kind::kActFwd> {  // h -> a
  static constexpr int kIn = 1, kOut = 1;
};
template <>
struct Arity<Kind::kActBwd> {  // da, h -> dh, a
  static constexpr int kIn = 2, kOut = 2;
};
template <>
struct Arity<Kind::kGluFwd> {  // g, u -> m
  static constexpr int kIn = 2, kOut = 1;
};
template <>
struct Arity<Kind::kGluBwd> {  // dm, g, u -> dg, du, m
  static constexpr int kIn = 3, kOut = 3;
};

// act_fwd of fp16/bf16 gelu runs two passes over a vector: every element with Phi from erff,
// then, only if one of them is below kErfFrom or NaN, those elements again with normcdff.
// Branching per element keeps the work between the branches apart: 40 instructions an element
// against 30 (sm_90a SASS, tests/tools/cuda_sass_loop); with a warp entering the second pass
// whenever one of its 256 elements is below -3 (~29% of warps for N(0, 1) values, 28
// instructions) and running normcdff for ~4% of its positions, ~34 on average. The other
// kernels branch per element: two passes hold every element's results and inputs at once
// (glu_fwd: 40 registers instead of 30, 6 blocks of 256 an SM instead of 8, and ptxas then
// issues u's load ~140 instructions after g's; act_bwd 62 instead of 40, glu_bwd 80 instead
// of 48), too few loads in flight for kernels that move 6-12 B an element.
template <typename T, Kind K, Act A>
constexpr bool kTwoPass = A == Act::kGelu && sizeof(T) == 2 && K == Kind::kActFwd;

// The activation's input among a kind's inputs: h (act_*) or g (glu_*).
template <Kind K>
constexpr int kActInput = (K == Kind::kActBwd || K == Kind::kGluBwd) ? 1 : 0;

template <typename T, Kind K, Act A, Cdf C>
__device__ __forceinline__ void apply(const float (&in)[Arity<K>::kIn],
                                      float (&out)[Arity<K>::kOut]) {
  float d;
  if constexpr (K == Kind::kActFwd) {
    out[0] = activation<T, A, false, C>(in[0], d);
  } else if constexpr (K == Kind::kActBwd) {
    const float a = activation<T, A, true, C>(in[1], d);
    out[0] = in[0] * d;
    out[1] = a;
  } else if constexpr (K == Kind::kGluFwd) {
    out[0] = activation<T, A, false, C>(in[0], d) * in[1];
  } else {
    const float a = activation<T, A, true, C>(in[1], d);
    out[0] = in[0] * in[2] * d;
    out[1] = in[0] * a;
    out[2] = a * in[2];
  }
}

template <typename T, int N>
struct Ptrs {
  T* p[N];
};

constexpr int kThreads = 256;

// Vectors [0, nvec) of kN elements, then the scalar elements [nvec * kN, n).
template <typename T, Kind K, Act A>
__global__ void __launch_bounds__(kThreads)
    ffn_elementwise_kernel(Ptrs<const T, Arity<K>::kIn> in, Ptrs<T, Arity<K>::kOut> out,
                           int64_t n, int64_t nvec) {
  constexpr int kIn = Arity<K>::kIn, kOut = Arity<K>::kOut;
  constexpr int kN = Pack16<T>::kN;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v = tid; v < nvec; v += stride) {
    float x[kIn][kN];
#pragma unroll
    for (int j = 0; j < kIn; ++j) Pack16<T>::unpack(ld16_stream(in.p[j] + v * kN), x[j]);
    float y[kOut][kN];
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      float xi[kIn], yi[kOut];
#pragma unroll
      for (int j = 0; j < kIn; ++j) xi[j] = x[j][e];
      apply<T, K, A, kTwoPass<T, K, A> ? Cdf::kErf : Cdf::kBranch>(xi, yi);
#pragma unroll
      for (int j = 0; j < kOut; ++j) y[j][e] = yi[j];
    }
    if constexpr (kTwoPass<T, K, A>) {
      bool again = false;  // an element below kErfFrom, or NaN (not >=)
#pragma unroll
      for (int e = 0; e < kN; ++e) again |= !(x[kActInput<K>][e] >= kErfFrom);
      if (again) {
#pragma unroll
        for (int e = 0; e < kN; ++e) {
          if (x[kActInput<K>][e] >= kErfFrom) continue;
          float xi[kIn], yi[kOut];
#pragma unroll
          for (int j = 0; j < kIn; ++j) xi[j] = x[j][e];
          apply<T, K, A, Cdf::kExact>(xi, yi);
#pragma unroll
          for (int j = 0; j < kOut; ++j) y[j][e] = yi[j];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kOut; ++j) st16_stream(out.p[j] + v * kN, Pack16<T>::pack(y[j]));
  }
  for (int64_t i = nvec * kN + tid; i < n; i += stride) {
    float xi[kIn], yi[kOut];
#pragma unroll
    for (int j = 0; j < kIn; ++j) xi[j] = to_float(in.p[j][i]);
    apply<T, K, A, Cdf::kBranch>(xi, yi);
#pragma unroll
    for (int j = 0; j < kOut; ++j) out.p[j][i] = from_float<T>(yi[j]);
  }
}

// Blocks of kThreads that ffn_elementwise_kernel<T, K, A> keeps resident on the current device
// at once (SMs times blocks per SM), queried once per device and kernel (the template arguments
// make the cache one per kernel: the kernels' function-pointer types do not name A).
template <typename T, Kind K, Act A>
int64_t resident_blocks() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cached[kMaxDevices] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int64_t known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, ffn_elementwise_kernel<T, K, A>, kThreads, 0));
  const int64_t blocks = static_cast<int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
  if (cacheable) cached[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

template <typename T, Kind K, Act A>
void launch(const at::Tensor* const (&in)[Arity<K>::kIn],
            const at::Tensor* const (&out)[Arity<K>::kOut]) {
  constexpr int kIn = Arity<K>::kIn, kOut = Arity<K>::kOut;
  constexpr int kN = Pack16<T>::kN;
  const int64_t n = in[0]->numel();
  if (n == 0) return;
  Ptrs<const T, kIn> pin;
  Ptrs<T, kOut> pout;
  bool aligned = true;
  for (int j = 0; j < kIn; ++j) {
    pin.p[j] = static_cast<const T*>(in[j]->data_ptr());
    aligned = aligned && reinterpret_cast<uintptr_t>(pin.p[j]) % 16 == 0;
  }
  for (int j = 0; j < kOut; ++j) {
    pout.p[j] = static_cast<T*>(out[j]->data_ptr());
    aligned = aligned && reinterpret_cast<uintptr_t>(pout.p[j]) % 16 == 0;
  }
  const int64_t nvec = aligned ? n / kN : 0;
  const int64_t items = nvec + (n - nvec * kN);
  const int blocks = static_cast<int>(
      std::min<int64_t>(resident_blocks<T, K, A>(), (items + kThreads - 1) / kThreads));
  ffn_elementwise_kernel<T, K, A>
      <<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(pin, pout, n, nvec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Kind K>
void dispatch(const std::string& activation, const at::Tensor* const (&in)[Arity<K>::kIn],
              const at::Tensor* const (&out)[Arity<K>::kOut]) {
  const Act act = parse_activation(activation);
  const auto with_act = [&](auto dtype_tag) {
    using T = decltype(dtype_tag);
    switch (act) {
      case Act::kGelu: return launch<T, K, Act::kGelu>(in, out);
      case Act::kGeluTanh: return launch<T, K, Act::kGeluTanh>(in, out);
      case Act::kRelu: return launch<T, K, Act::kRelu>(in, out);
      case Act::kRelu2: return launch<T, K, Act::kRelu2>(in, out);
      case Act::kSilu: return launch<T, K, Act::kSilu>(in, out);
    }
  };
  switch (in[0]->scalar_type()) {
    case at::kFloat: return with_act(float{});
    case at::kHalf: return with_act(__half{});
    case at::kBFloat16: return with_act(__nv_bfloat16{});
    default:
      FA_CHECK(false, "fastattn._cuda: FFN kernels take float32, float16 or bfloat16, got ",
               in[0]->scalar_type());
  }
}

}  // namespace

void act_fwd_cuda(const at::Tensor& h, const std::string& activation, const at::Tensor& a) {
  dispatch<Kind::kActFwd>(activation, {&h}, {&a});
}

void act_bwd_cuda(const at::Tensor& da, const at::Tensor& h, const std::string& activation,
                  const at::Tensor& dh, const at::Tensor& a) {
  dispatch<Kind::kActBwd>(activation, {&da, &h}, {&dh, &a});
}

void glu_fwd_cuda(const at::Tensor& g, const at::Tensor& u, const std::string& activation,
                  const at::Tensor& m) {
  dispatch<Kind::kGluFwd>(activation, {&g, &u}, {&m});
}

void glu_bwd_cuda(const at::Tensor& dm, const at::Tensor& g, const at::Tensor& u,
                  const std::string& activation, const at::Tensor& dg, const at::Tensor& du,
                  const at::Tensor& m) {
  dispatch<Kind::kGluBwd>(activation, {&dm, &g, &u}, {&dg, &du, &m});
}

}  // namespace fastattn
