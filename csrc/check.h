// FA_CHECK(cond, parts...): TORCH_CHECK whose message is assembled without iostreams.
//
// Why: on the two H200 machines so far (g++ 13.3 of Ubuntu 24.04, Python 3.12.3, torch 2.11
// from pip) argument checks of both extensions that put a number into their message crashed
// the process (SIGSEGV) instead of raising; checks with only strings and dtypes raised cleanly.
// The backtrace (benchmarks/results/gpu-h200-2026-11-29-1914/check_crash.log) ends in
// std::basic_ostream::_M_insert<long> (presumably the num_put facet lookup of the
// std::ostringstream that c10::str builds) inside the extension itself, which on that machine
// showed no libstdc++.so in ldd. Until that build is understood, no message of ours goes
// through an ostream: numbers are formatted with std::to_string / snprintf and the parts joined
// into one std::string, which c10::str passes through untouched. The message text is the one
// TORCH_CHECK would have made (shapes as "[4, 6]", doubles as "%g").
//
// Every argument type must have a put() below: there is deliberately no generic fallback.

#pragma once

#include <c10/core/Device.h>
#include <c10/core/Layout.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace fastattn {
namespace check_detail {

inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, std::string_view v) { s.append(v.data(), v.size()); }
inline void put(std::string& s, char v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? "1" : "0"; }  // as an ostream prints it

template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>,
                                       int> = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}

template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline void put(std::string& s, T v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
  s += buf;
}

inline void put(std::string& s, c10::ArrayRef<int64_t> v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}

inline void put(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void put(std::string& s, const c10::Device& v) { s += v.str(); }  // formatted in libc10

inline void put(std::string& s, c10::Layout v) {
  switch (v) {
    case c10::kStrided: s += "Strided"; return;
    case c10::kSparse: s += "Sparse"; return;
    case c10::kSparseCsr: s += "SparseCsr"; return;
    case c10::kSparseCsc: s += "SparseCsc"; return;
    case c10::kSparseBsr: s += "SparseBsr"; return;
    case c10::kSparseBsc: s += "SparseBsc"; return;
    case c10::kMkldnn: s += "Mkldnn"; return;
    default: s += "Layout(" + std::to_string(static_cast<int>(v)) + ")";
  }
}

template <typename... Ts>
std::string message(const Ts&... parts) {
  std::string s;
  (put(s, parts), ...);
  return s;
}

}  // namespace check_detail
}  // namespace fastattn

#define FA_CHECK(cond, ...) TORCH_CHECK(cond, ::fastattn::check_detail::message(__VA_ARGS__))
