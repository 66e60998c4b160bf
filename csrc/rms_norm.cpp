// RMSNorm on CPU, forward and backward (see kernels/rms_norm.py for the math).
//
// Rows run in parallel (at::parallel_for); within a row the loops are vectorised (omp simd, the
// AVX2 instantiation when the CPU has it). dweight is deterministic for any thread count: the rows
// are cut into a fixed number of chunks, each chunk sums its rows in order into its own fp32
// partial row, and the partials are added in chunk order.
#include <torch/library.h>

#include <vector>

#include "cpu_simd.h"

namespace packtune {
namespace {

constexpr int64_t kMaxChunks = 64;

template <typename T>
PACKTUNE_ALWAYS_INLINE void fwd_rows(const T* x, const float* w, T* y, float* rstd, int64_t begin,
                                     int64_t end, int64_t cols, float eps) {
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    float sumsq = 0.0f;
#pragma omp simd reduction(+ : sumsq)
    for (int64_t j = 0; j < cols; ++j) {
      const float v = static_cast<float>(xr[j]);
      sumsq += v * v;
    }
    const float rs = 1.0f / std::sqrt(sumsq / static_cast<float>(cols) + eps);
    rstd[r] = rs;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) yr[j] = static_cast<T>(static_cast<float>(xr[j]) * rs * w[j]);
  }
}

// dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w, xhat = x * rstd; dw_partial += dy * xhat.
template <typename T>
PACKTUNE_ALWAYS_INLINE void bwd_rows(const T* dy, const T* x, const float* w, const float* rstd, T* dx,
                                     float* dw_partial, int64_t begin, int64_t end, int64_t cols) {
  for (int64_t r = begin; r < end; ++r) {
    const T *xr = x + r * cols, *dyr = dy + r * cols;
    T* dxr = dx + r * cols;
    const float rs = rstd[r];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < cols; ++j)
      dot += static_cast<float>(dyr[j]) * w[j] * static_cast<float>(xr[j]);
    const float c = dot * rs * rs / static_cast<float>(cols);
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const float xv = static_cast<float>(xr[j]), dyv = static_cast<float>(dyr[j]);
      dxr[j] = static_cast<T>(rs * (dyv * w[j] - xv * c));
      dw_partial[j] += dyv * xv * rs;
    }
  }
}

#if PACKTUNE_X86
template <typename T>
PACKTUNE_AVX2 void fwd_rows_avx2(const T* x, const float* w, T* y, float* rstd, int64_t b, int64_t e,
                                 int64_t cols, float eps) {
  fwd_rows(x, w, y, rstd, b, e, cols, eps);
}
template <typename T>
PACKTUNE_AVX2 void bwd_rows_avx2(const T* dy, const T* x, const float* w, const float* rstd, T* dx,
                                 float* dwp, int64_t b, int64_t e, int64_t cols) {
  bwd_rows(dy, x, w, rstd, dx, dwp, b, e, cols);
}
#endif
template <typename T>
void fwd_rows_default(const T* x, const float* w, T* y, float* rstd, int64_t b, int64_t e, int64_t cols,
                      float eps) {
  fwd_rows(x, w, y, rstd, b, e, cols, eps);
}
template <typename T>
void bwd_rows_default(const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* dwp,
                      int64_t b, int64_t e, int64_t cols) {
  bwd_rows(dy, x, w, rstd, dx, dwp, b, e, cols);
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  check_kernel_dtype(x, "rms_norm");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "packtune.rms_norm: x must be contiguous [rows, cols]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 1 &&
                  weight.size(0) == x.size(1),
              "packtune.rms_norm: weight must be contiguous float32 [cols]");
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_inputs(x, weight);
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const float* wp = weight.data_ptr<float>();
    float* rp = rstd.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
#if PACKTUNE_X86
      if (cpu_has_avx2()) return fwd_rows_avx2(xp, wp, yp, rp, b, e, cols, static_cast<float>(eps));
#endif
      fwd_rows_default(xp, wp, yp, rp, b, e, cols, static_cast<float>(eps));
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& rstd) {
  check_inputs(x, weight);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous(),
              "packtune.rms_norm: dy must be contiguous and shaped like x");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == x.size(0), "packtune.rms_norm: bad rstd");
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor dx = at::empty_like(x);
  const int64_t chunks = std::max<int64_t>(1, std::min(rows, kMaxChunks));
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  at::Tensor partial = at::zeros({chunks, cols}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd", [&] {
    const scalar_t *dyp = dy.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const float *wp = weight.data_ptr<float>(), *rp = rstd.data_ptr<float>();
    float* pp = partial.data_ptr<float>();
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t b = c * rows_per_chunk, e = std::min(rows, b + rows_per_chunk);
#if PACKTUNE_X86
        if (cpu_has_avx2()) {
          bwd_rows_avx2(dyp, xp, wp, rp, dxp, pp + c * cols, b, e, cols);
          continue;
        }
#endif
        bwd_rows_default(dyp, xp, wp, rp, dxp, pp + c * cols, b, e, cols);
      }
    });
  });
  // Sum the partials in chunk order, columns in parallel.
  at::Tensor dweight = at::empty({cols}, x.options().dtype(at::kFloat));
  const float* pp = partial.data_ptr<float>();
  float* dwp = dweight.data_ptr<float>();
  at::parallel_for(0, cols, 1024, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      float acc = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) acc += pp[c * cols + j];
      dwp[j] = acc;
    }
  });
  return {dx, dweight};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(packtune, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(packtune, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace packtune
