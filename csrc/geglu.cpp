// GeGLU on CPU: y = gelu_tanh(g) * u and its backward (see kernels/geglu.py for the math).
//
// Work is split into (row, column chunk) items over at::parallel_for; each chunk runs a scalar loop
// (std::tanh; no hand-written SIMD yet). bfloat16/float16 chunks are widened to float first.
#include <torch/library.h>

#include <cmath>

#include "cpu_simd.h"

namespace packtune {
namespace {

constexpr int64_t kChunk = 2048;

// gelu_tanh(g) = 0.5 g (1 + t), t = tanh(c (g + a g^3)); its derivative 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3a g^2).
constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kA = 0.044715f;

void fwd_f32(const float* g, const float* u, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = std::tanh(kC * (g[i] + kA * g[i] * g[i] * g[i]));
    y[i] = 0.5f * g[i] * (1.0f + t) * u[i];
  }
}

void bwd_f32(const float* dy, const float* g, const float* u, float* dg, float* du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i];
    const float t = std::tanh(kC * (x + kA * x * x * x));
    const float dgelu = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kC * (1.0f + 3.0f * kA * x * x);
    du[i] = dy[i] * 0.5f * x * (1.0f + t);
    dg[i] = dy[i] * u[i] * dgelu;
  }
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
  check_kernel_dtype(t, "geglu");
  TORCH_CHECK(t.dim() == 2 && t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(),
              "packtune.geglu: ", name, " must be [rows, cols] like gate, got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, "packtune.geglu: ", name, " needs a unit last stride");
}

at::Tensor geglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, gate, "gate");
  check_rows(up, gate, "up");
  const int64_t rows = gate.size(0), cols = gate.size(1);
  at::Tensor y = at::empty({rows, cols}, gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "geglu_fwd", [&] {
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

std::tuple<at::Tensor, at::Tensor> geglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up) {
  check_rows(gate, gate, "gate");
  check_rows(up, gate, "up");
  check_rows(dy, gate, "dy");
  TORCH_CHECK(dy.is_contiguous(), "packtune.geglu: dy must be contiguous");
  const int64_t rows = gate.size(0), cols = gate.size(1);
  at::Tensor dgate = at::empty({rows, cols}, gate.options());
  at::Tensor dup = at::empty({rows, cols}, gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "geglu_bwd", [&] {
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
  m.def("geglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("geglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(packtune, CPU, m) {
  m.impl("geglu_fwd", &geglu_fwd);
  m.impl("geglu_bwd", &geglu_bwd);
}

}  // namespace packtune
