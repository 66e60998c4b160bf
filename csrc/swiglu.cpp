// SwiGLU on CPU: y = silu(g) * u and its backward (see kernels/swiglu.py for the math).
//
// Work is split into (row, column chunk) items over at::parallel_for; each chunk runs an AVX2 loop
// (8 floats, polynomial exp) or a scalar one. bfloat16/float16 chunks are widened to float first.
#include <torch/library.h>

#include "cpu_simd.h"

namespace packtune {
namespace {

constexpr int64_t kChunk = 2048;

PACKTUNE_ALWAYS_INLINE void fwd_scalar(const float* g, const float* u, float* y, int64_t i, int64_t n) {
  for (; i < n; ++i) y[i] = g[i] * sigmoid_scalar(g[i]) * u[i];
}

PACKTUNE_ALWAYS_INLINE void bwd_scalar(const float* dy, const float* g, const float* u, float* dg,
                                       float* du, int64_t i, int64_t n) {
  for (; i < n; ++i) {
    const float s = sigmoid_scalar(g[i]);
    du[i] = dy[i] * g[i] * s;
    dg[i] = dy[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
  }
}

#if PACKTUNE_X86
PACKTUNE_AVX2 void fwd_avx2(const float* g, const float* u, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 s = sigmoid256(gv);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(gv, s), _mm256_loadu_ps(u + i)));
  }
  fwd_scalar(g, u, y, i, n);
}

PACKTUNE_AVX2 void bwd_avx2(const float* dy, const float* g, const float* u, float* dg, float* du,
                            int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 dyv = _mm256_loadu_ps(dy + i);
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 s = sigmoid256(gv);
    _mm256_storeu_ps(du + i, _mm256_mul_ps(dyv, _mm256_mul_ps(gv, s)));
    const __m256 dsilu = _mm256_mul_ps(s, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one));
    _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(dyv, _mm256_loadu_ps(u + i)), dsilu));
  }
  bwd_scalar(dy, g, u, dg, du, i, n);
}
#endif

void fwd_f32(const float* g, const float* u, float* y, int64_t n) {
#if PACKTUNE_X86
  if (cpu_has_avx2()) return fwd_avx2(g, u, y, n);
#endif
  fwd_scalar(g, u, y, 0, n);
}

void bwd_f32(const float* dy, const float* g, const float* u, float* dg, float* du, int64_t n) {
#if PACKTUNE_X86
  if (cpu_has_avx2()) return bwd_avx2(dy, g, u, dg, du, n);
#endif
  bwd_scalar(dy, g, u, dg, du, 0, n);
}

// One chunk in any kernel dtype: float directly, bfloat16/float16 through float buffers.
template <typename T>
void fwd_chunk(const T* g, const T* u, T* y, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    fwd_f32(g, u, y, n);
  } else {
    float gb[kChunk], ub[kChunk], yb[kChunk];
    load_float(g, gb, n);
    load_float(u, ub, n);
    fwd_f32(gb, ub, yb, n);
    store_float(yb, y, n);
  }
}

template <typename T>
void bwd_chunk(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    bwd_f32(dy, g, u, dg, du, n);
  } else {
    float db[kChunk], gb[kChunk], ub[kChunk], dgb[kChunk], dub[kChunk];
    load_float(dy, db, n);
    load_float(g, gb, n);
    load_float(u, ub, n);
    bwd_f32(db, gb, ub, dgb, dub, n);
    store_float(dgb, dg, n);
    store_float(dub, du, n);
  }
}

// Calls fn(row, col0, len) for every (row, chunk) of an [rows, cols] problem, in parallel.
template <typename Fn>
void for_each_chunk(int64_t rows, int64_t cols, const Fn& fn) {
  const int64_t chunks_per_row = (cols + kChunk - 1) / kChunk;
  at::parallel_for(0, rows * chunks_per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / chunks_per_row, col0 = (item % chunks_per_row) * kChunk;
      fn(row, col0, std::min(kChunk, cols - col0));
    }
  });
}

void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name) {
  check_kernel_dtype(t, "swiglu");
  TORCH_CHECK(t.dim() == 2 && t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(),
              "packtune.swiglu: ", name, " must be [rows, cols] like gate, got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, "packtune.swiglu: ", name, " needs a unit last stride");
}

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, gate, "gate");
  check_rows(up, gate, "up");
  const int64_t rows = gate.size(0), cols = gate.size(1);
  at::Tensor y = at::empty({rows, cols}, gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_fwd", [&] {
    const scalar_t* g = gate.data_ptr<scalar_t>();
    const scalar_t* u = up.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    const int64_t sg = gate.stride(0), su = up.stride(0);
    for_each_chunk(rows, cols, [&](int64_t r, int64_t c0, int64_t n) {
      const scalar_t *gr = g + r * sg + c0, *ur = u + r * su + c0;
      scalar_t* yr = out + r * cols + c0;
      fwd_chunk(gr, ur, yr, n);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up) {
  check_rows(gate, gate, "gate");
  check_rows(up, gate, "up");
  check_rows(dy, gate, "dy");
  TORCH_CHECK(dy.is_contiguous(), "packtune.swiglu: dy must be contiguous");
  const int64_t rows = gate.size(0), cols = gate.size(1);
  at::Tensor dgate = at::empty({rows, cols}, gate.options());
  at::Tensor dup = at::empty({rows, cols}, gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_bwd", [&] {
    const scalar_t* d = dy.data_ptr<scalar_t>();
    const scalar_t* g = gate.data_ptr<scalar_t>();
    const scalar_t* u = up.data_ptr<scalar_t>();
    scalar_t* dg = dgate.data_ptr<scalar_t>();
    scalar_t* du = dup.data_ptr<scalar_t>();
    const int64_t sg = gate.stride(0), su = up.stride(0);
    for_each_chunk(rows, cols, [&](int64_t r, int64_t c0, int64_t n) {
      const int64_t o = r * cols + c0;
      const scalar_t *gr = g + r * sg + c0, *ur = u + r * su + c0;
      bwd_chunk(d + o, gr, ur, dg + o, du + o, n);
    });
  });
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(packtune, m) {
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(packtune, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
}

}  // namespace packtune
