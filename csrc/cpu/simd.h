// Shared helpers of the C++ CPU kernels: runtime instruction-set dispatch for the hot loops,
// forced inlining, bit casts and branch-free float16/bfloat16 <-> float32 conversions (integer
// selects instead of branches, so that loops over them auto-vectorise).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

// Runtime ISA dispatch (GNU ifunc). GCC >= 12 is where target_clones on function templates with
// the x86-64-vN level names was tested; elsewhere the functions are built once for the
// compiler's default target.
#if defined(FA_ROW_KERNEL)
// set on the command line (tests build each instruction-set variant on its own)
#elif defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
#define FA_ROW_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FA_ROW_KERNEL
#endif

// Helpers are force-inlined into the cloned row functions, so they get compiled for each
// clone's instruction set (a call would run the baseline build of the helper).
#if defined(__GNUC__)
#define FA_INLINE inline __attribute__((always_inline))
#else
#define FA_INLINE inline
#endif

#if defined(__GNUC__)
#define FA_RESTRICT __restrict__
#else
#define FA_RESTRICT
#endif

namespace fastattn {
namespace cpu {

template <typename To, typename From>
FA_INLINE To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// ---- float16 / bfloat16 <-> float32, branch-free so that loops over them vectorise ---------
// (Bit-exact with c10::Half / c10::BFloat16 for every non-NaN input, checked exhaustively.
// Their selects have float arithmetic in an arm, which GCC if-converts only under
// -fno-trapping-math, set in fastattn/_buildinfo.py; without it they are correct but scalar.)

FA_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t expo = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  // Normal: rebias the exponent from 15 to 127 (+112) and widen the mantissa 10 -> 23 bits.
  const uint32_t normal = sign | ((expo + 112u) << 23) | (mant << 13);
  // Inf / NaN keep the all-ones exponent and the payload.
  const uint32_t inf_nan = sign | 0x7f800000u | (mant << 13);
  // Subnormal: value = mant * 2^-24, exact in float32.
  const uint32_t subnormal = sign | bit_cast<uint32_t>(static_cast<float>(mant) * 0x1p-24f);
  return bit_cast<float>(expo == 0 ? subnormal : (expo == 31 ? inf_nan : normal));
}

// Round to nearest, ties to even, like c10::Half.
FA_INLINE uint16_t float_to_half_bits(float f) {
  const uint32_t bits = bit_cast<uint32_t>(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t mag = bits & 0x7fffffffu;
  // |f| >= 65520 (half-way between the largest half, 65504, and 2^16) rounds to inf;
  // NaN becomes a quiet NaN.
  const uint32_t huge = mag > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // |f| < 2^-14 is a half subnormal, a multiple of 2^-24: in 0.5f + |f| the float32 ulp is
  // 2^-24, so the FPU's own round-to-nearest-even does the rounding, and the bits above 0.5f
  // are the half's mantissa (0x400 when it rounds up to the smallest normal, also correct).
  const uint32_t subnormal = bit_cast<uint32_t>(bit_cast<float>(mag) + 0.5f) - 0x3f000000u;
  // Normal: rebias 127 -> 15 and drop 13 mantissa bits, adding 0xfff plus the lowest kept bit
  // so that exact ties round to even; a carry into the exponent is the correct round-up.
  const uint32_t normal = (mag - (112u << 23) + 0xfffu + ((mag >> 13) & 1u)) >> 13;
  const uint32_t out = mag >= 0x477ff000u ? huge : (mag < 0x38800000u ? subnormal : normal);
  return static_cast<uint16_t>(out | sign);
}

FA_INLINE float bf16_bits_to_float(uint16_t h) {
  return bit_cast<float>(static_cast<uint32_t>(h) << 16);
}

// Round to nearest, ties to even, like c10::BFloat16; NaN stays a (quiet) NaN.
FA_INLINE uint16_t float_to_bf16_bits(float f) {
  const uint32_t bits = bit_cast<uint32_t>(f);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return static_cast<uint16_t>(f != f ? quiet_nan : rounded);
}

// Storage type of each tensor dtype and its conversion to / from the accumulation type.
// Half and bfloat16 are handled as raw uint16_t bits so the loops see plain integers.
template <typename scalar_t>
struct Elem {  // float, double
  using raw = scalar_t;
  using acc = scalar_t;
  static FA_INLINE acc load(raw v) { return v; }
  static FA_INLINE raw store(acc v) { return v; }
};
template <>
struct Elem<c10::Half> {
  using raw = uint16_t;
  using acc = float;
  static FA_INLINE acc load(raw v) { return half_bits_to_float(v); }
  static FA_INLINE raw store(acc v) { return float_to_half_bits(v); }
};
template <>
struct Elem<c10::BFloat16> {
  using raw = uint16_t;
  using acc = float;
  static FA_INLINE acc load(raw v) { return bf16_bits_to_float(v); }
  static FA_INLINE raw store(acc v) { return float_to_bf16_bits(v); }
};

}  // namespace cpu
}  // namespace fastattn
