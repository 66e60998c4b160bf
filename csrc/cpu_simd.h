// Shared helpers for the CPU kernels: runtime ISA dispatch, a vectorised exp, dtype conversion.
//
// setup.py compiles for the portable x86-64 baseline (no -march). Hot loops are therefore written
// once as an always-inline body and instantiated per ISA: inside a function compiled with
// target("avx2,fma") (or "avx512f"), the inlined loops use 256-bit (512-bit) registers; a plain
// function is the fallback, chosen at run time by cpu_has_avx2() / cpu_has_avx512(). Kernels that
// write their body over the float vectors below (GCC/Clang vector extensions: + - * / and
// comparisons work lane-wise, a scalar operand is broadcast) get all three from run_widest().
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PACKTUNE_X86 1
#define PACKTUNE_AVX2 __attribute__((target("avx2,fma")))
#define PACKTUNE_AVX512 __attribute__((target("avx512f,avx2,fma")))
#else
#define PACKTUNE_X86 0
#define PACKTUNE_AVX2
#define PACKTUNE_AVX512
#endif
#define PACKTUNE_ALWAYS_INLINE inline __attribute__((always_inline))

namespace packtune {

// ATEN_CPU_CAPABILITY (default, avx2 or avx512), which caps ATen's own CPU kernels, caps these too:
// the tests run the narrower paths of an AVX-512 machine through it.
inline bool cpu_capability_allows(const char* level) {
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  if (cap == nullptr || *cap == '\0') return true;
  if (std::strcmp(level, "avx512") == 0) return std::strcmp(cap, "avx512") == 0;
  return std::strcmp(cap, "avx2") == 0 || std::strcmp(cap, "avx512") == 0;  // level avx2
}

inline bool cpu_has_avx2() {
#if PACKTUNE_X86
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_capability_allows("avx2");
  }();
  return supported;
#else
  return false;
#endif
}

inline bool cpu_has_avx512() {
#if PACKTUNE_X86
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && cpu_has_avx2() && cpu_capability_allows("avx512");
  }();
  return supported;
#else
  return false;
#endif
}

// The dtypes the CPU kernels take; math is always fp32.
inline void check_kernel_dtype(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kHalf,
              "packtune.", op, ": the cpu kernel takes float32, bfloat16 or float16, got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "packtune.", op, ": the cpu kernel takes CPU tensors");
}

// Float vectors of 1, 4, 8 and 16 lanes and the int32 lanes their comparisons give. Helpers over
// them are templates that take and return vectors by value: they are always inlined into the
// per-ISA function that runs them, so the ABI note GCC attaches to such signatures does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float f32x1 __attribute__((vector_size(4)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
template <class V>
struct IntLanes {
  typedef int32_t type __attribute__((vector_size(sizeof(V))));
};
template <class V>
constexpr int64_t kLanes = sizeof(V) / sizeof(float);

template <class V>
PACKTUNE_ALWAYS_INLINE V load_lanes(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V>
PACKTUNE_ALWAYS_INLINE void store_lanes(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// a where mask, else b.
template <class V>
PACKTUNE_ALWAYS_INLINE V select(typename IntLanes<V>::type mask, V a, V b) {
  using I = typename IntLanes<V>::type;
  return (V)((mask & (I)a) | (~mask & (I)b));
}

// exp(x), x <= 88: range reduction x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for exp(r)
// (Cephes coefficients, ~1 ulp), 2^n built in the exponent bits; x below -87.33 gives exactly 0
// (softmax terms that small must vanish, not become the smallest normal float). n = round(x / ln2)
// by adding 1.5 * 2^23, which leaves the integer in the low mantissa bits.
template <class V>
PACKTUNE_ALWAYS_INLINE V exp_lanes(V x) {
  using I = typename IntLanes<V>::type;
  const I underflow = x < -87.3365447f;
  x = select<V>(underflow, V{} - 87.3365447f, x);
  x = select<V>(x > 88.0f, V{} + 88.0f, x);
  const V magic = V{} + 12582912.0f;
  const V t = x * 1.44269504088896341f + magic;
  const V n = t - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + (r + 1.0f);
  const I two_n = ((I)t - (I)magic + 127) << 23;
  return (V)((I)(p * (V)two_n) & ~underflow);
}

// sigmoid(x) = 1 / (1 + exp(-x)).
template <class V>
PACKTUNE_ALWAYS_INLINE V sigmoid_lanes(V x) {
  return 1.0f / (1.0f + exp_lanes(-x));
}

#if PACKTUNE_X86
// exp_lanes for the __m256 of the hand-written AVX2 kernels.
PACKTUNE_AVX2 inline __m256 exp256(__m256 x) { return (__m256)exp_lanes((f32x8)x); }
#endif

// Runs kernel.template run<V>() with V the widest float vector this CPU has: f32x16 (AVX-512),
// f32x8 (AVX2 + FMA), else f32x4 (the portable baseline). run<V> must be always-inline, so its
// loops compile for the ISA of the function that calls it here.
#if PACKTUNE_X86
template <class Kernel>
PACKTUNE_AVX512 void run_avx512(const Kernel& kernel) {
  kernel.template run<f32x16>();
}
template <class Kernel>
PACKTUNE_AVX2 void run_avx2(const Kernel& kernel) {
  kernel.template run<f32x8>();
}
#endif
template <class Kernel>
void run_widest(const Kernel& kernel) {
#if PACKTUNE_X86
  if (cpu_has_avx512()) return run_avx512(kernel);
  if (cpu_has_avx2()) return run_avx2(kernel);
#endif
  kernel.template run<f32x4>();
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// Copy n elements of any kernel dtype into/out of a float buffer.
template <typename T>
PACKTUNE_ALWAYS_INLINE void load_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
PACKTUNE_ALWAYS_INLINE void store_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

}  // namespace packtune
