// Shared helpers for the CPU kernels: runtime AVX2 dispatch, an AVX2 exp, dtype conversion.
//
// setup.py compiles for the portable x86-64 baseline (no -march). Hot loops are therefore written
// once as an always-inline body and instantiated twice: inside a function compiled with
// target("avx2,fma") (the compiler vectorises the inlined loops with 256-bit registers) and inside
// a plain one, chosen at run time by cpu_has_avx2().
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PACKTUNE_X86 1
#define PACKTUNE_AVX2 __attribute__((target("avx2,fma")))
#else
#define PACKTUNE_X86 0
#define PACKTUNE_AVX2
#endif
#define PACKTUNE_ALWAYS_INLINE inline __attribute__((always_inline))

namespace packtune {

inline bool cpu_has_avx2() {
#if PACKTUNE_X86
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
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

#if PACKTUNE_X86
// exp(x) for 8 floats, x <= 88: range reduction x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial
// for exp(r) (Cephes coefficients, ~1 ulp), 2^n built in the exponent bits; x below -87.33 gives
// exactly 0 (softmax terms that small must vanish, not become the smallest normal float).
PACKTUNE_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3365447f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365447f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// sigmoid(x) = 1 / (1 + exp(-x)) for 8 floats.
PACKTUNE_AVX2 inline __m256 sigmoid256(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}
#endif

inline float sigmoid_scalar(float x) { return 1.0f / (1.0f + std::exp(-x)); }

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
