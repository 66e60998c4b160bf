// Rotary embedding on CPU, rotate-half layout, q and k in one pass (see kernels/rotary.py).
//
// Tokens run in parallel; each token reads its cos/sin row once and rotates all of its q and k
// heads. backward=true applies the transposed rotation (the gradient).
#include <torch/library.h>

#include <atomic>

#include "cpu_simd.h"

namespace packtune {
namespace {

template <typename T>
PACKTUNE_ALWAYS_INLINE void rotate(const T* x, T* out, const float* c, const float* s, int64_t half,
                                   bool backward) {
  if (backward) {
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = static_cast<float>(x[j]), x2 = static_cast<float>(x[j + half]);
      out[j] = static_cast<T>(x1 * c[j] + x2 * s[j + half]);
      out[j + half] = static_cast<T>(x2 * c[j + half] - x1 * s[j]);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = static_cast<float>(x[j]), x2 = static_cast<float>(x[j + half]);
      out[j] = static_cast<T>(x1 * c[j] - x2 * s[j]);
      out[j + half] = static_cast<T>(x2 * c[j + half] + x1 * s[j + half]);
    }
  }
}

struct Heads {
  int64_t n, stride_t, stride_h;
};

template <typename T>
PACKTUNE_ALWAYS_INLINE void rotate_tokens(const T* q, const T* k, T* qo, T* ko, const float* cos,
                                          const float* sin, const int64_t* pos, Heads hq, Heads hk,
                                          int64_t dim, bool backward, int64_t b, int64_t e) {
  const int64_t half = dim / 2;
  for (int64_t t = b; t < e; ++t) {
    const float *c = cos + pos[t] * dim, *s = sin + pos[t] * dim;
    for (int64_t h = 0; h < hq.n; ++h)
      rotate(q + t * hq.stride_t + h * hq.stride_h, qo + (t * hq.n + h) * dim, c, s, half, backward);
    for (int64_t h = 0; h < hk.n; ++h)
      rotate(k + t * hk.stride_t + h * hk.stride_h, ko + (t * hk.n + h) * dim, c, s, half, backward);
  }
}

#if PACKTUNE_X86
template <typename T>
PACKTUNE_AVX2 void rotate_tokens_avx2(const T* q, const T* k, T* qo, T* ko, const float* cos,
                                      const float* sin, const int64_t* pos, Heads hq, Heads hk, int64_t dim,
                                      bool backward, int64_t b, int64_t e) {
  rotate_tokens(q, k, qo, ko, cos, sin, pos, hq, hk, dim, backward, b, e);
}
#endif
template <typename T>
void rotate_tokens_default(const T* q, const T* k, T* qo, T* ko, const float* cos, const float* sin,
                           const int64_t* pos, Heads hq, Heads hk, int64_t dim, bool backward, int64_t b,
                           int64_t e) {
  rotate_tokens(q, k, qo, ko, cos, sin, pos, hq, hk, dim, backward, b, e);
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin, const at::Tensor& positions, bool backward) {
  check_kernel_dtype(q, "rotary");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                  q.scalar_type() == k.scalar_type() && q.stride(2) == 1 && k.stride(2) == 1,
              "packtune.rotary: q and k must be [T, H, D] of one dtype with a unit last stride");
  const int64_t tokens = q.size(0), dim = q.size(2);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == dim,
              "packtune.rotary: cos/sin must be contiguous float32 [max_positions, head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == tokens,
              "packtune.rotary: positions must be contiguous int64 [T]");
  const int64_t max_pos = cos.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  std::atomic<bool> in_range{true};
  at::parallel_for(0, tokens, 4096, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      if (pos[t] < 0 || pos[t] >= max_pos) in_range = false;
  });
  TORCH_CHECK(in_range, "packtune.rotary: a position is outside the cos/sin table [0, ", max_pos, ")");
  at::Tensor qo = at::empty(q.sizes(), q.options());
  at::Tensor ko = at::empty(k.sizes(), k.options());
  const Heads hq{q.size(1), q.stride(0), q.stride(1)}, hk{k.size(1), k.stride(0), k.stride(1)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>();
    scalar_t *qop = qo.data_ptr<scalar_t>(), *kop = ko.data_ptr<scalar_t>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    at::parallel_for(0, tokens, 16, [&](int64_t b, int64_t e) {
#if PACKTUNE_X86
      if (cpu_has_avx2()) return rotate_tokens_avx2(qp, kp, qop, kop, cp, sp, pos, hq, hk, dim, backward, b, e);
#endif
      rotate_tokens_default(qp, kp, qop, kop, cp, sp, pos, hq, hk, dim, backward, b, e);
    });
  });
  return {qo, ko};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(packtune, m) {
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor positions, bool backward) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(packtune, CPU, m) { m.impl("rotary", &rotary); }

}  // namespace packtune
