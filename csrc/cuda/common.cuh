// Device helpers shared by the CUDA ops of fastattn (cross-entropy now; attention decode, FFN
// epilogues and Adam reuse them): scalar and 16-byte vector conversions between fp32 and the
// storage dtypes, 16-byte loads/stores with cache hints, the split of a row into an unaligned
// head, an aligned 16-byte body and a tail, a fast exp2, and warp/block all-reductions.
//
// Everything compiles under the flags torch's extension builder adds
// (__CUDA_NO_HALF_OPERATORS__, __CUDA_NO_HALF_CONVERSIONS__, __CUDA_NO_BFLOAT16_CONVERSIONS__,
// ...): fp16/bf16 are only converted through the explicit intrinsics below, never implicitly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastattn {
namespace dev {

constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 1024;
constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = exp2(x * kLog2e)

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000u); }

// ---------------------------------------------------------------------------------------------
// Scalar conversions (fp32 is the math type of every op; storage is fp32, fp16 or bf16).
// Rounding to fp16/bf16 is round-to-nearest-even, as torch's .to() does.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------------------------
// 16-byte vectors. A uint4 is the unit of one LDG.128/STG.128: 4 fp32 or 8 fp16/bf16 values.
// Pack16<T>::kN values of T fit in one; unpack/pack convert them to and from fp32 in order
// (element i of the vector is column base + i).
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Pack16;

template <>
struct Pack16<float> {
  static constexpr int kN = 4;
  static __device__ __forceinline__ void unpack(const uint4& r, float (&out)[kN]) {
    out[0] = __uint_as_float(r.x);
    out[1] = __uint_as_float(r.y);
    out[2] = __uint_as_float(r.z);
    out[3] = __uint_as_float(r.w);
  }
  static __device__ __forceinline__ uint4 pack(const float (&in)[kN]) {
    return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]),
                      __float_as_uint(in[3]));
  }
};

template <>
struct Pack16<__nv_bfloat16> {
  static constexpr int kN = 8;
  // bf16 is the top half of an fp32, so widening is a shift (low element) or a mask (high
  // element) of each 32-bit word: exact and cheaper than a conversion instruction.
  static __device__ __forceinline__ void unpack(const uint4& r, float (&out)[kN]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ uint4 pack(const float (&in)[kN]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);  // .x = low
      memcpy(&w[i], &h, sizeof(uint32_t));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Pack16<__half> {
  static constexpr int kN = 8;
  static __device__ __forceinline__ void unpack(const uint4& r, float (&out)[kN]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], sizeof(uint32_t));
      const float2 f = __half22float2(h);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ uint4 pack(const float (&in)[kN]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 h = __floats2half2_rn(in[2 * i], in[2 * i + 1]);  // .x = low
      memcpy(&w[i], &h, sizeof(uint32_t));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// Plain 16-byte load/store (cached in L1 and L2 with normal priority). The pointer must be
// 16-byte aligned.
__device__ __forceinline__ uint4 ld16(const void* p) { return *static_cast<const uint4*>(p); }
__device__ __forceinline__ void st16(void* p, const uint4& v) { *static_cast<uint4*>(p) = v; }
// "Cache streaming" (.cs) variants: the line is marked evict-first in L2. Use them for the
// last read of data and for outputs this kernel never reads back, so that they do not push out
// lines that another pass is about to re-read.
__device__ __forceinline__ uint4 ld16_stream(const void* p) {
  return __ldcs(static_cast<const uint4*>(p));
}
__device__ __forceinline__ void st16_stream(void* p, const uint4& v) {
  __stcs(static_cast<uint4*>(p), v);
}

// A row of n elements starting at p, split for 16-byte access:
//   columns [0, head)                     scalar (p is not 16-byte aligned there),
//   columns [head, head + nvec * kN)      nvec aligned 16-byte vectors,
//   columns [tail_begin, n)               scalar, fewer than kN of them.
// head < kN and n - tail_begin < kN, so both scalar parts together are < 2 * kN <= 14 elements
// and are covered by the first 32 threads of a block. Requires p aligned to sizeof(T), which
// every torch tensor of dtype T is. Column indices are int: callers check n < 2^31.
struct RowSplit {
  int head;
  int nvec;
  int tail_begin;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* p, int n) {
  constexpr int kN = Pack16<T>::kN;
  const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u);
  int head = static_cast<int>(((16u - mis) & 15u) / sizeof(T));
  head = head < n ? head : n;
  const int nvec = (n - head) / kN;
  return RowSplit{head, nvec, head + nvec * kN};
}

// 2^x with one MUFU.EX2 (ex2.approx.ftz: ~2 ulp relative error, subnormal results flushed to
// 0). exp2(-inf) = +0, exp2(+inf) = +inf, NaN stays NaN. The precise exp2f costs extra
// instructions for subnormal handling that softmax-style sums do not need.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------------------------
// Reductions. Op is a functor (T, T) -> T that must be commutative bit for bit (a op b == b op
// a exactly, true of +, fmaxf and any symmetric formula of them) and associative up to rounding;
// then the xor butterfly leaves the *same bits* in every lane, so every thread of a warp/block
// sees one identical result and no broadcast step is needed. Beware that nvcc contracts
// a * b + c * d into fma(a, b, c * d), which is not symmetric: write such ops with __fmul_rn.
// T is any trivially copyable type whose size is a multiple of 4 bytes (float, or a small
// struct of floats).
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ T shfl_xor(const T& v, int lane_mask) {
  static_assert(sizeof(T) % 4 == 0, "shfl_xor: type size must be a multiple of 4 bytes");
  constexpr int kWords = sizeof(T) / 4;
  int w[kWords];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], lane_mask);
  T out;
  memcpy(&out, w, sizeof(T));
  return out;
}

// All 32 lanes must be active (full mask).
template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = op(v, shfl_xor(v, offset));
  return v;
}

// Every thread of a 1-D block gets the reduction of all threads' v. Requirements: blockDim.x is
// a multiple of 32 and at most 1024; every thread of the block calls it (it has barriers);
// `smem` holds at least blockDim.x / 32 values of T and may be reused by consecutive calls (the
// leading barrier keeps a call from overwriting partials the previous call is still reading).
// Cost: two warp butterflies and two __syncthreads.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, const T& identity, T* smem) {
  v = warp_allreduce(v, op);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  // Each warp reduces the per-warp partials itself instead of warp 0 broadcasting the result:
  // saves a third barrier, and by the bitwise-commutativity rule above all warps agree.
  v = lane < nwarps ? smem[lane] : identity;
  return warp_allreduce(v, op);
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// smem: at least 32 floats.
__device__ __forceinline__ float block_allreduce_sum(float v, float* smem) {
  return block_allreduce(v, SumOp{}, 0.0f, smem);
}
__device__ __forceinline__ float block_allreduce_max(float v, float* smem) {
  return block_allreduce(v, MaxOp{}, neg_inf(), smem);
}

}  // namespace dev
}  // namespace fastattn
