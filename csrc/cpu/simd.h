// Shared helpers of the C++ CPU kernels: runtime instruction-set dispatch for the hot loops,
// forced inlining, bit casts and branch-free float16/bfloat16 <-> float32 conversions (integer
// selects instead of branches, so that loops over them auto-vectorise).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
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

// ---- exp -----------------------------------------------------------------------------------

// Returns v unchanged, but the compiler can no longer treat it as a known constant.
FA_INLINE float opaque(float v) {
#if defined(__GNUC__)
  uint32_t bits = bit_cast<uint32_t>(v);
  asm("" : "+r"(bits));
  v = bit_cast<float>(bits);
#endif
  return v;
}

template <typename acc_t>
struct Exp;

// exp(x) for float32 from arithmetic only, so that a loop calling it vectorises.
//   x = n ln2 + r, n = round(x / ln2), |r| <= ln2 / 2; ln2 is split in a high part with 9
//   significant bits (n * hi is exact for |n| <= 2^15) and a low correction, so r carries no
//   cancellation error. e^r ~ 1 + r + c2 r^2 + ... + c6 r^6, coefficients fitted for minimax
//   relative error on [-ln2/2, ln2/2] (3.7e-9, 0.03 ulp; degree 5 would be 1.1e-7 and give
//   2.4 ulp). Measured against float64 exp over the whole range: <= 1 ulp with FMA (v3 / v4
//   clones), <= 1.2 ulp without.
//   The result is (2 e^r) * 2^(n-1), the polynomial's coefficients pre-doubled, so that the
//   exponent field n - 1 + 127 stays <= 254 at the top of the range. Inputs are clamped to
//   [-104, 88.8]: 88.8 overflows to inf, as it should. At the bottom the biased exponent is
//   clamped at 0, i.e. the power of two becomes 0: x < -87 (results below ~1.7e-38) gives 0,
//   as the GPU's ex2.approx.ftz also flushes; exp(-inf) = 0. (Exact subnormals would need the
//   scale split in two factors: 5 more operations, ~30% more work in the hottest loop.)
//   The clamps are written "lo > x ? lo : x" so that a NaN x (compare false) passes through
//   them, and through r, to the result; they compile to one vmaxps / vminps.
// 16 vector operations per 8 (AVX2) or 16 (AVX-512) lanes, no branches, no tables.
template <>
struct Exp<float> {
  float lo, hi;
  // The bounds are handed to the loops as run-time values on purpose. As literals, GCC
  // threads the clamp branches and folds exp into a constant on the clamped sides, which
  // leaves control flow in the loop: without AVX-512 masking the loop then does not vectorise
  // at all (measured 5-8x slower on AVX2).
  static FA_INLINE Exp make() { return Exp{opaque(-104.0f), opaque(88.8f)}; }

  FA_INLINE float operator()(float x) const { return sum(x, 0.0f); }

  // max(x, lo): where exp has already reached 0. Lets a caller form exp(x) * x without the
  // NaN of 0 * -inf at a masked (-inf) class, with no select that could block vectorising.
  FA_INLINE float floor(float x) const { return lo > x ? lo : x; }

  // exp(x + x_lo) for an unevaluated sum with |x_lo| <= ~2^-11 |x| (e.g. -a^2/2 split into
  // an exact product and its correction): x - n * ln2_hi is exact, so x_lo joins the reduced
  // argument r without the rounding of x + x_lo, which at |x| ~ 80 alone would cost 10 ulp.
  // operator()(x) is sum(x, 0). |r| grows by at most |x_lo|.
  FA_INLINE float sum(float x, float x_lo) const {
    x = lo > x ? lo : x;
    x = hi < x ? hi : x;
    const float shifter = 0x1.8p23f;
    // Adding 1.5 * 2^23 rounds x / ln2 to an integer held in the low mantissa bits.
    const float kn = (x + x_lo) * 1.44269504088896341f + shifter;
    const float nf = kn - shifter;
    float r = x - nf * 0.693359375f;  // ln2 hi = 355 / 512
    r = r + x_lo;
    r = r - nf * -2.12194440e-4f;     // ln2 - hi
    float p = 2 * 0x1.6bd908p-10f;    // 2 e^r
    p = p * r + 2 * 0x1.1239b0p-7f;
    p = p * r + 2 * 0x1.555682p-5f;
    p = p * r + 2 * 0x1.555492p-3f;
    p = p * r + 2 * 0x1.fffffep-2f;
    p = p * r + 2.0f;
    p = p * r + 2.0f;
    // n - 1 + 127, from the integer in kn's low bits; n in [-150, 128]
    int32_t biased = bit_cast<int32_t>(kn) - (bit_cast<int32_t>(shifter) - 126);
    biased = biased < 0 ? 0 : biased;  // (255 past the top is inf: the right overflow)
    return p * bit_cast<float>(static_cast<uint32_t>(biased) << 23);
  }
};

// ---- sigmoid and the normal CDF (float32, arithmetic only, built on Exp<float>) -----------
// Accuracy measured against float64 (torch.sigmoid, 0.5 erfc(-x / sqrt 2), exp) on every 61st
// float32 bit pattern with 2^-30 <= |x| <= 100 (2 x 10^7 inputs), AVX-512 clone and baseline
// build (no FMA), in ulp of the float32 result, wherever that result is >= 2^-122; below it
// Exp flushes (absolute error < 2^-126). NaN in, NaN out; +-inf give the limits.

// s = 1 / (1 + e^-x), and 1 - s = e^-x s where s > 1/2 (1 - s would cancel there).
// For x < -88.8 e^-x is inf and s = 0, 1 - s = 1. Measured: s <= 2.4 ulp, 1 - s <= 2.7 ulp
// (mean 0.38 ulp each).
struct Sigmoid {
  Exp<float> exp;
  static FA_INLINE Sigmoid make() { return Sigmoid{Exp<float>::make()}; }
  FA_INLINE float operator()(float x, float& one_minus) const {
    const float e = exp(-x);
    const float s = 1.0f / (1.0f + e);
    one_minus = e > 1.0f ? 1.0f - s : e * s;
    return s;
  }
};

// Phi(x) = 0.5 (1 + erf(x / sqrt 2)), the standard normal CDF, and g = exp(-x^2 / 2)
// (the density is g / sqrt(2 pi)). With a = |x|:
//   a <= 1: Phi(x) = 1/2 + x P(x^2), P of degree 5 fitted for minimax relative error of
//           (Phi(x) - 1/2) / x (7e-10 in float64);
//   a > 1:  Phi(-a) = g t Q(t), t = 2 / (2 + a), Q of degree 9 fitted to Phi(-a) e^(a^2/2) / t
//           on [1, 14.5] (2.7e-9 relative in float64); Phi(a) = 1 - Phi(-a), no cancellation
//           since Phi(-a) < 0.16. Computing 1 + erf(x / sqrt 2) instead would lose all digits
//           for x << 0.
//   g: a^2 / 2 at a ~ 10 carries a rounding of 2e-6 absolute, i.e. 16 ulp on g, so a is split
//   in a head ah of 12 bits (ah^2 exact) and al = a - ah: -a^2/2 = -ah^2/2 - al (a + ah)/2,
//   passed to Exp::sum as an unevaluated pair. a is clamped to 20 there (exp(-200) = 0), so
//   that x = +-inf gives g = 0, Phi = 1 or 0. Phi(x) < 2^-126 (x < -13.2) flushes to 0.
// Measured: Phi <= 4.6 ulp (mean 0.25; the worst near |x| in [1, 4], from the two roundings of
// t and of Q's Horner steps), g <= 1.2 ulp (mean 0.13).
struct NormalCdf {
  Exp<float> exp;
  static FA_INLINE NormalCdf make() { return NormalCdf{Exp<float>::make()}; }
  FA_INLINE float operator()(float x, float& g) const {
    const float a = bit_cast<float>(bit_cast<uint32_t>(x) & 0x7fffffffu);
    const float ac = 20.0f < a ? 20.0f : a;  // NaN passes
    const float ah = bit_cast<float>(bit_cast<uint32_t>(ac) & 0xfffff000u);
    const float al = ac - ah;
    g = exp.sum(-0.5f * (ah * ah), -0.5f * (al * (ac + ah)));
    const float x2 = x * x;
    float p = -0x1.00d76ep-17f;
    p = p * x2 + 0x1.dbffc0p-14f;
    p = p * x2 + -0x1.36fd4ap-10f;
    p = p * x2 + 0x1.46ce4ep-7f;
    p = p * x2 + -0x1.105832p-4f;
    p = p * x2 + 0x1.988454p-2f;
    const float small = 0.5f + x * p;
    const float t = 2.0f / (2.0f + a);
    float q = 0x1.f956a0p-4f;
    q = q * t + -0x1.848a28p-2f;
    q = q * t + 0x1.6eb14cp-2f;
    q = q * t + 0x1.50820cp-5f;
    q = q * t + -0x1.b14d84p-3f;
    q = q * t + -0x1.5c12b4p-6f;
    q = q * t + 0x1.4ca0dcp-5f;
    q = q * t + 0x1.34dda4p-3f;
    q = q * t + 0x1.985750p-3f;
    q = q * t + 0x1.9885aap-3f;
    const float lower = g * (t * q);  // Phi(-a)
    const float tail = x < 0.0f ? lower : 1.0f - lower;
    return a <= 1.0f ? small : tail;
  }
};

// float64 logits are a correctness path, not a speed path: libm's exp.
template <>
struct Exp<double> {
  double lo;  // exp(-800) = 0 in float64
  static FA_INLINE Exp make() { return Exp{-800.0}; }
  FA_INLINE double operator()(double x) const { return std::exp(x); }
  FA_INLINE double floor(double x) const { return lo > x ? lo : x; }
};

}  // namespace cpu
}  // namespace fastattn
