// CPU elementwise kernels of the fused FFN (MLP and SwiGLU): act_fwd, act_bwd, glu_fwd,
// glu_bwd. The contract (activations, derivatives, shapes) is the FFN kernel spec; the matmuls
// around these kernels are ATen's (MKL).
//
// Every function is one streaming pass over contiguous (T, F) tensors treated as flat arrays:
// each input element is read once and each output written once, nothing else is touched.
// Traffic per element, B = bytes of the dtype: act_fwd 2B, act_bwd 4B, glu_fwd 3B, glu_bwd 6B.
// The flat range is cut into chunks of >= kMinElementsPerTask for at::parallel_for.
//
// Speed without -march=native: the loops are plain index loops over raw storage (fp16/bf16 as
// uint16_t bits, converted branch-free by Elem<>), the activations are arithmetic and selects
// only (Exp / Sigmoid / NormalCdf of simd.h, no libm), so GCC auto-vectorises them; each range
// function is compiled per instruction set by FA_ROW_KERNEL (target_clones). Math is float32;
// results are rounded to the storage dtype once.
//
// Activations and derivatives (x = pre-activation, all in float32):
//   gelu       a = x Phi(x)                      a' = Phi(x) + x phi(x),  phi = e^(-x^2/2)/sqrt(2 pi)
//   gelu_tanh  a = x sigma(z),  z = 2k (x + c x^3), k = sqrt(2/pi), c = 0.044715
//              since 0.5 (1 + tanh(z/2)) = sigma(z): no tanh, and no cancellation in 1 + tanh
//              for x << 0 (where the fp32 tanh form returns 0 or noise);
//              a' = sigma(z) + x sigma(z) (1 - sigma(z)) z',  z' = 2k (1 + 3c x^2)
//              (z itself is rounded: a relative error of ~1.5 ulp of |z| on sigma(z), i.e.
//              |z| * 1e-7 relative on a, the conditioning of the formula in float32)
//   relu       a = max(x, 0)                     a' = [x > 0]  (0 at 0; 1 at NaN, as torch)
//   relu2      a = max(x, 0)^2                   a' = 2 max(x, 0)
//   silu       a = x sigma(x)                    a' = sigma(x) (1 + x (1 - sigma(x)))
// max(x, 0) is written "0 > x ? 0 : x" so that NaN propagates like torch.relu.

#include "ops.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

namespace fastattn {
namespace cpu {
namespace {

// ~10-20 us of work per task at a few ns per element: below that a thread costs more than it
// saves. 97 x 130 activations are one task.
constexpr int64_t kMinElementsPerTask = 32768;

enum class Act { kGelu, kGeluTanh, kRelu, kRelu2, kSilu };

Act parse_activation(const std::string& name) {
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "relu") return Act::kRelu;
  if (name == "relu2") return Act::kRelu2;
  if (name == "silu") return Act::kSilu;
  FA_CHECK(false, "fastattn._C: unknown activation '", name,
           "'; valid: gelu, gelu_tanh, relu, relu2, silu");
}

// Activation<A>: make() outside the loop (the Exp clamps must stay run-time values, see
// simd.h); value(x) = act(x); both(x, d) = act(x) and sets d = act'(x).
template <Act A>
struct Activation;

template <>
struct Activation<Act::kGelu> {
  NormalCdf cdf;
  static FA_INLINE Activation make() { return Activation{NormalCdf::make()}; }
  FA_INLINE float value(float x) const {
    float g;
    return x * cdf(x, g);
  }
  FA_INLINE float both(float x, float& d) const {
    constexpr float kInvSqrt2Pi = 0.398942280401432678f;
    float g;
    const float phi_big = cdf(x, g);
    d = phi_big + x * (g * kInvSqrt2Pi);
    return x * phi_big;
  }
};

template <>
struct Activation<Act::kGeluTanh> {
  Sigmoid sigmoid;
  static constexpr float k2 = 2 * 0.797884560802865356f;  // 2 sqrt(2 / pi)
  static constexpr float c = 0.044715f;
  static FA_INLINE Activation make() { return Activation{Sigmoid::make()}; }
  FA_INLINE float value(float x) const {
    float om;
    return x * sigmoid(x * (k2 + (k2 * c) * (x * x)), om);
  }
  FA_INLINE float both(float x, float& d) const {
    const float x2 = x * x;
    float om;
    const float s = sigmoid(x * (k2 + (k2 * c) * x2), om);
    d = s + x * (s * om) * (k2 + (3 * k2 * c) * x2);
    return x * s;
  }
};

template <>
struct Activation<Act::kRelu> {
  static FA_INLINE Activation make() { return Activation{}; }
  FA_INLINE float value(float x) const { return 0.0f > x ? 0.0f : x; }
  FA_INLINE float both(float x, float& d) const {
    d = x <= 0.0f ? 0.0f : 1.0f;
    return 0.0f > x ? 0.0f : x;
  }
};

template <>
struct Activation<Act::kRelu2> {
  static FA_INLINE Activation make() { return Activation{}; }
  FA_INLINE float value(float x) const {
    const float r = 0.0f > x ? 0.0f : x;
    return r * r;
  }
  FA_INLINE float both(float x, float& d) const {
    const float r = 0.0f > x ? 0.0f : x;
    d = 2.0f * r;
    return r * r;
  }
};

template <>
struct Activation<Act::kSilu> {
  Sigmoid sigmoid;
  static FA_INLINE Activation make() { return Activation{Sigmoid::make()}; }
  FA_INLINE float value(float x) const {
    float om;
    return x * sigmoid(x, om);
  }
  FA_INLINE float both(float x, float& d) const {
    float om;
    const float s = sigmoid(x, om);
    d = s * (1.0f + x * om);
    return x * s;
  }
};

template <typename scalar_t>
using raw_of = typename Elem<scalar_t>::raw;

// ---- the four range kernels: elements [begin, end) of the flat arrays ----------------------

template <typename scalar_t, Act A>
FA_ROW_KERNEL void act_fwd_range(const raw_of<scalar_t>* FA_RESTRICT h,
                                 raw_of<scalar_t>* FA_RESTRICT a, int64_t begin, int64_t end) {
  using E = Elem<scalar_t>;
  const Activation<A> act = Activation<A>::make();
  for (int64_t i = begin; i < end; ++i) a[i] = E::store(act.value(E::load(h[i])));
}

// dh = da * act'(h), a = act(h)
template <typename scalar_t, Act A>
// (da and dh may be the same array, dh written in place: not restrict; each element is read
// before it is written.)
FA_ROW_KERNEL void act_bwd_range(const raw_of<scalar_t>* da, const raw_of<scalar_t>* FA_RESTRICT h,
                                 raw_of<scalar_t>* dh, raw_of<scalar_t>* FA_RESTRICT a,
                                 int64_t begin, int64_t end) {
  using E = Elem<scalar_t>;
  const Activation<A> act = Activation<A>::make();
  for (int64_t i = begin; i < end; ++i) {
    float d;
    const float v = act.both(E::load(h[i]), d);
    dh[i] = E::store(E::load(da[i]) * d);
    a[i] = E::store(v);
  }
}

// m = act(g) * u
template <typename scalar_t, Act A>
FA_ROW_KERNEL void glu_fwd_range(const raw_of<scalar_t>* FA_RESTRICT g,
                                 const raw_of<scalar_t>* FA_RESTRICT u,
                                 raw_of<scalar_t>* FA_RESTRICT m, int64_t begin, int64_t end) {
  using E = Elem<scalar_t>;
  const Activation<A> act = Activation<A>::make();
  for (int64_t i = begin; i < end; ++i) m[i] = E::store(act.value(E::load(g[i])) * E::load(u[i]));
}

// dg = dm * u * act'(g), du = dm * act(g), m = act(g) * u (dm and dg may be the same array)
template <typename scalar_t, Act A>
FA_ROW_KERNEL void glu_bwd_range(const raw_of<scalar_t>* dm,
                                 const raw_of<scalar_t>* FA_RESTRICT g,
                                 const raw_of<scalar_t>* FA_RESTRICT u,
                                 raw_of<scalar_t>* dg, raw_of<scalar_t>* FA_RESTRICT du,
                                 raw_of<scalar_t>* FA_RESTRICT m, int64_t begin, int64_t end) {
  using E = Elem<scalar_t>;
  const Activation<A> act = Activation<A>::make();
  for (int64_t i = begin; i < end; ++i) {
    float d;
    const float v = act.both(E::load(g[i]), d);
    const float dmi = E::load(dm[i]);
    const float ui = E::load(u[i]);
    dg[i] = E::store(dmi * ui * d);
    du[i] = E::store(dmi * v);
    m[i] = E::store(v * ui);
  }
}

// ---- dispatch ---------------------------------------------------------------------------------

template <typename scalar_t>
raw_of<scalar_t>* raw_ptr(const at::Tensor& t) {
  return reinterpret_cast<raw_of<scalar_t>*>(t.data_ptr<scalar_t>());
}

// Calls fn(std::integral_constant<Act, A>{}) for the runtime activation.
template <typename Fn>
void with_activation(Act act, const Fn& fn) {
  switch (act) {
    case Act::kGelu: return fn(std::integral_constant<Act, Act::kGelu>{});
    case Act::kGeluTanh: return fn(std::integral_constant<Act, Act::kGeluTanh>{});
    case Act::kRelu: return fn(std::integral_constant<Act, Act::kRelu>{});
    case Act::kRelu2: return fn(std::integral_constant<Act, Act::kRelu2>{});
    case Act::kSilu: return fn(std::integral_constant<Act, Act::kSilu>{});
  }
}

// Calls fn(scalar_t{}) for float32, float16 or bfloat16 (the binding rejects other dtypes).
template <typename Fn>
void with_dtype(at::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kHalf: return fn(c10::Half{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    default: FA_CHECK(false, "fastattn._C: FFN kernels take float32, float16 or bfloat16, got ",
                      dtype);
  }
}

// Runs body(begin, end) over [0, n) in parallel chunks.
template <typename Body>
void for_chunks(int64_t n, const Body& body) {
  if (n == 0) return;
  at::parallel_for(0, n, kMinElementsPerTask, body);
}

}  // namespace

at::Tensor act_fwd(const at::Tensor& h, const std::string& activation) {
  const Act act = parse_activation(activation);
  at::Tensor a = at::empty_like(h, at::MemoryFormat::Contiguous);
  const int64_t n = h.numel();
  with_dtype(h.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    with_activation(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      const auto* hp = raw_ptr<scalar_t>(h);
      auto* ap = raw_ptr<scalar_t>(a);
      for_chunks(n, [&](int64_t b, int64_t e) { act_fwd_range<scalar_t, A>(hp, ap, b, e); });
    });
  });
  return a;
}

std::tuple<at::Tensor, at::Tensor> act_bwd(const at::Tensor& da, const at::Tensor& h,
                                           const std::string& activation, bool overwrite_da) {
  const Act act = parse_activation(activation);
  at::Tensor dh = overwrite_da ? da : at::empty_like(h, at::MemoryFormat::Contiguous);
  at::Tensor a = at::empty_like(h, at::MemoryFormat::Contiguous);
  const int64_t n = h.numel();
  with_dtype(h.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    with_activation(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      const auto* dap = raw_ptr<scalar_t>(da);
      const auto* hp = raw_ptr<scalar_t>(h);
      auto* dhp = raw_ptr<scalar_t>(dh);
      auto* ap = raw_ptr<scalar_t>(a);
      for_chunks(n, [&](int64_t b, int64_t e) {
        act_bwd_range<scalar_t, A>(dap, hp, dhp, ap, b, e);
      });
    });
  });
  return {dh, a};
}

at::Tensor glu_fwd(const at::Tensor& g, const at::Tensor& u, const std::string& activation) {
  const Act act = parse_activation(activation);
  at::Tensor m = at::empty_like(g, at::MemoryFormat::Contiguous);
  const int64_t n = g.numel();
  with_dtype(g.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    with_activation(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      const auto* gp = raw_ptr<scalar_t>(g);
      const auto* up = raw_ptr<scalar_t>(u);
      auto* mp = raw_ptr<scalar_t>(m);
      for_chunks(n, [&](int64_t b, int64_t e) { glu_fwd_range<scalar_t, A>(gp, up, mp, b, e); });
    });
  });
  return m;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_bwd(const at::Tensor& dm, const at::Tensor& g,
                                                       const at::Tensor& u,
                                                       const std::string& activation,
                                                       bool overwrite_dm) {
  const Act act = parse_activation(activation);
  at::Tensor dg = overwrite_dm ? dm : at::empty_like(g, at::MemoryFormat::Contiguous);
  at::Tensor du = at::empty_like(g, at::MemoryFormat::Contiguous);
  at::Tensor m = at::empty_like(g, at::MemoryFormat::Contiguous);
  const int64_t n = g.numel();
  with_dtype(g.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    with_activation(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      const auto* dmp = raw_ptr<scalar_t>(dm);
      const auto* gp = raw_ptr<scalar_t>(g);
      const auto* up = raw_ptr<scalar_t>(u);
      auto* dgp = raw_ptr<scalar_t>(dg);
      auto* dup = raw_ptr<scalar_t>(du);
      auto* mp = raw_ptr<scalar_t>(m);
      for_chunks(n, [&](int64_t b, int64_t e) {
        glu_bwd_range<scalar_t, A>(dmp, gp, up, dgp, dup, mp, b, e);
      });
    });
  });
  return {dg, du, m};
}

}  // namespace cpu
}  // namespace fastattn
