// CPU kernels of the total gradient norm and the clipping scale: grad_norm, scale_grads_.
//
// The math and conventions are those of fastattn/ops/grad_norm/reference.py (the oracle); this
// file says how it is computed fast. Inputs are validated here with FA_CHECK (not in
// bindings.cpp), so that the binding file only gains its m.def lines.
//
// Memory traffic: the norm reads each element once (4 B fp32, 2 B fp16/bf16) and writes one
// double per work item; the scale reads and writes each element once. Both are memory bound.
//
// Work split: every tensor is cut into items of kChunk elements and the (tensor, range) list of
// the whole call is spread over the threads in one at::parallel_for (hundreds of small grads
// share one parallel region). Each item writes its partial (sum of squares, or max |x|) to its
// own slot, and the partials are combined in item order on one thread: the item boundaries do
// not depend on the thread count, so the norm is bitwise the same for any number of threads
// and any run.
//
// Accuracy of the 2-norm: within an item, 16 float32 lanes accumulate x*x (16 independent
// chains, so the loop vectorises without reassociation: GCC keeps 2 AVX2 / 1 AVX-512
// accumulators) over blocks of kBlock elements, i.e. 128 terms per lane and block; each
// block's lanes are then added into float64 lanes. The relative error is ~128 float32 ulps
// worst case per block (typically ~sqrt(128)), then float64: well below the
// float32 rounding of the result for any realistic gradient.
//
// The inf-norm is an integer max: with the sign bit cleared, the IEEE bit patterns of fp32,
// fp16 and bf16 order like the magnitudes, and every NaN sorts above +inf, so max(bits & ~sign)
// is max |x| with NaN propagating (as torch's) and is exact; it vectorises to vpmaxu[dw].

#include "ops.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

// Elements per work item: 64K fp32 = 256 KB read, ~10-20 us of one core's bandwidth, far above
// the cost of handing out an item; a 1M-element tensor gives 16 items to balance.
constexpr int64_t kChunk = 1 << 16;
constexpr int kLanes = 16;
constexpr int64_t kBlock = 2048;  // elements summed in float32 before folding into float64

template <typename scalar_t>
FA_ROW_KERNEL double sumsq_range(const typename Elem<scalar_t>::raw* FA_RESTRICT x, int64_t n) {
  using E = Elem<scalar_t>;
  double total[kLanes] = {};
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    float acc[kLanes] = {};
    for (int64_t j = i; j < i + kBlock; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float v = E::load(x[j + l]);
        acc[l] += v * v;
      }
    }
    for (int l = 0; l < kLanes; ++l) total[l] += acc[l];
  }
  float acc[kLanes] = {};
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = E::load(x[i + l]);
      acc[l] += v * v;
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const float v = E::load(x[i]);
    acc[l] += v * v;
  }
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += total[l] + static_cast<double>(acc[l]);
  return sum;
}

// max |x| of n values, as the bit pattern of the magnitude (see the header comment).
template <typename bits_t>
FA_ROW_KERNEL bits_t absmax_bits_range(const bits_t* FA_RESTRICT x, int64_t n) {
  constexpr bits_t kMag = static_cast<bits_t>(~(bits_t(1) << (8 * sizeof(bits_t) - 1)));
  bits_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bits_t v = static_cast<bits_t>(x[i] & kMag);
    m = v > m ? v : m;
  }
  return m;
}

template <typename scalar_t>
FA_ROW_KERNEL void scale_range(typename Elem<scalar_t>::raw* FA_RESTRICT x, int64_t n,
                               float coef) {
  using E = Elem<scalar_t>;
  for (int64_t i = 0; i < n; ++i) x[i] = E::store(E::load(x[i]) * coef);
}

struct Item {
  int64_t tensor, begin, end;
};

std::vector<Item> make_items(const std::vector<at::Tensor>& tensors) {
  std::vector<Item> items;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      items.push_back({static_cast<int64_t>(t), b, std::min(n, b + kChunk)});
    }
  }
  return items;
}

// One partial per item, in parallel; `fn(tensor, begin, end)` computes it.
template <typename Fn>
std::vector<double> partials(const std::vector<at::Tensor>& tensors, Fn fn) {
  const std::vector<Item> items = make_items(tensors);
  std::vector<double> out(items.size());
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      out[k] = fn(tensors[it.tensor], it.begin, it.end);
    }
  });
  return out;
}

template <typename scalar_t>
double sumsq_partial(const at::Tensor& t, int64_t begin, int64_t end) {
  using raw = typename Elem<scalar_t>::raw;
  return sumsq_range<scalar_t>(static_cast<const raw*>(t.const_data_ptr()) + begin, end - begin);
}

double absmax_partial(const at::Tensor& t, int64_t begin, int64_t end) {
  if (t.scalar_type() == at::kFloat) {
    const auto* x = static_cast<const uint32_t*>(t.const_data_ptr()) + begin;
    return bit_cast<float>(absmax_bits_range<uint32_t>(x, end - begin));
  }
  const auto* x = static_cast<const uint16_t*>(t.const_data_ptr()) + begin;
  const uint16_t m = absmax_bits_range<uint16_t>(x, end - begin);
  return t.scalar_type() == at::kHalf ? half_bits_to_float(m) : bf16_bits_to_float(m);
}

void check_list(const std::vector<at::Tensor>& tensors, const char* op) {
  if (tensors.empty()) return;
  const auto dt = tensors[0].defined() ? tensors[0].scalar_type() : at::kFloat;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    FA_CHECK(t.defined(), op, ": tensors[", i, "] is an undefined tensor");
    FA_CHECK(t.layout() == at::kStrided, op, ": tensors[", i, "] must be dense (strided), "
             "got layout ", t.layout());
    FA_CHECK(t.device().is_cpu(), op, ": tensors[", i, "] must be a CPU tensor, got device ",
             t.device());
    FA_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                    t.scalar_type() == at::kBFloat16,
             op, ": tensors[", i, "] must be float32, float16 or bfloat16, got ",
             t.scalar_type());
    FA_CHECK(t.scalar_type() == dt, op, ": all tensors must share one dtype (tensors[0] is ",
             dt, "), tensors[", i, "] is ", t.scalar_type());
    FA_CHECK(t.is_contiguous(), op, ": tensors[", i, "] must be contiguous, got strides ",
             t.strides());
  }
}

}  // namespace

at::Tensor grad_norm(const std::vector<at::Tensor>& tensors, double norm_type) {
  check_list(tensors, "grad_norm");
  const bool inf_norm = std::isinf(norm_type) && norm_type > 0;
  FA_CHECK(inf_norm || norm_type == 2.0, "grad_norm: the CPU kernel supports norm_type 2 and "
           "inf, got ", norm_type, " (other p run the reference)");
  double result = 0.0;
  if (!tensors.empty()) {
    const auto dt = tensors[0].scalar_type();
    if (inf_norm) {
      for (const double m : partials(tensors, absmax_partial)) {
        // max with NaN propagation (a NaN partial sticks)
        result = (m > result || m != m || result != result) ? (result != result ? result : m)
                                                              : result;
      }
    } else {
      const auto fn = dt == at::kFloat  ? &sumsq_partial<float>
                      : dt == at::kHalf ? &sumsq_partial<c10::Half>
                                        : &sumsq_partial<c10::BFloat16>;
      for (const double s : partials(tensors, fn)) result += s;  // fixed order
      result = std::sqrt(result);
    }
  }
  return at::scalar_tensor(static_cast<float>(result), at::TensorOptions().dtype(at::kFloat));
}

void scale_grads_(const std::vector<at::Tensor>& tensors, double max_norm,
                  const at::Tensor& total_norm) {
  check_list(tensors, "scale_grads_");
  FA_CHECK(total_norm.defined() && total_norm.device().is_cpu() &&
                  total_norm.scalar_type() == at::kFloat && total_norm.numel() == 1,
              "scale_grads_: total_norm must be a float32 one-element CPU tensor, got ",
              total_norm.defined() ? total_norm.toString() : std::string("undefined"));
  if (tensors.empty()) return;
  // torch: clamp((total_norm + 1e-6).reciprocal() * max_norm, max=1), all in float32;
  // std::min keeps a NaN coefficient (comparison with NaN is false), as clamp does.
  const float norm = total_norm.item<float>();
  const float coef = std::min((1.0f / (norm + 1e-6f)) * static_cast<float>(max_norm), 1.0f);
  const auto dt = tensors[0].scalar_type();
  const std::vector<Item> items = make_items(tensors);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      void* base = tensors[it.tensor].data_ptr();
      const int64_t n = it.end - it.begin;
      if (dt == at::kFloat) {
        scale_range<float>(static_cast<float*>(base) + it.begin, n, coef);
      } else if (dt == at::kHalf) {
        scale_range<c10::Half>(static_cast<uint16_t*>(base) + it.begin, n, coef);
      } else {
        scale_range<c10::BFloat16>(static_cast<uint16_t*>(base) + it.begin, n, coef);
      }
    }
  });
}

}  // namespace cpu
}  // namespace fastattn
