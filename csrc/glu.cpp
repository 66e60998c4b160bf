// Gated activations on CPU: y = act(gate) * up and its backward, act = silu or gelu_tanh (see
// kernels/glu.py for the math). One template over the activation, run with 16-, 8- or 4-lane float
// vectors (AVX-512, AVX2 or the portable baseline, chosen at run time: cpu_simd.h's run_widest).
//
// Work is split into (row, column chunk) items over at::parallel_for; bfloat16/float16 chunks are
// widened to float first.
#include <torch/library.h>

#include <type_traits>

#include "cpu_simd.h"

namespace packtune {
namespace {

constexpr int64_t kChunk = 2048;

// Both activations are g * sigmoid(z(g)) (gelu_tanh because 0.5 (1 + tanh(x)) = sigmoid(2x)), so
// with s = sigmoid(z): act(g) = g s and act'(g) = s (1 + g (1 - s) z'(g)).
struct Silu {
  template <class V>
  static PACKTUNE_ALWAYS_INLINE V z(V g) { return g; }
  template <class V>
  static PACKTUNE_ALWAYS_INLINE V dz(V) { return V{} + 1.0f; }
};

struct GeluTanh {  // z = 2c (g + a g^3), c = sqrt(2 / pi), a = 0.044715
  static constexpr float k2C = 1.5957691216057308f, kA = 0.044715f;
  template <class V>
  static PACKTUNE_ALWAYS_INLINE V z(V g) { return k2C * g * (1.0f + kA * g * g); }
  template <class V>
  static PACKTUNE_ALWAYS_INLINE V dz(V g) { return k2C * (1.0f + 3.0f * kA * g * g); }
};

// y = act(g) * u over n floats: V-wide steps, then the rest one lane at a time.
template <class Act, class V>
PACKTUNE_ALWAYS_INLINE void forward_lanes(const float* g, const float* u, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes<V> <= n; i += kLanes<V>) {
    const V gv = load_lanes<V>(g + i);
    store_lanes(y + i, gv * sigmoid_lanes(Act::z(gv)) * load_lanes<V>(u + i));
  }
  if constexpr (kLanes<V> > 1) forward_lanes<Act, f32x1>(g + i, u + i, y + i, n - i);
}

// dup = dy * act(g), dgate = dy * u * act'(g) over n floats.
template <class Act, class V>
PACKTUNE_ALWAYS_INLINE void backward_lanes(const float* dy, const float* g, const float* u, float* dg,
                                           float* du, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes<V> <= n; i += kLanes<V>) {
    const V dyv = load_lanes<V>(dy + i), gv = load_lanes<V>(g + i);
    const V s = sigmoid_lanes(Act::z(gv));
    store_lanes(du + i, dyv * (gv * s));
    store_lanes(dg + i, dyv * load_lanes<V>(u + i) * (s * (1.0f + gv * (1.0f - s) * Act::dz(gv))));
  }
  if constexpr (kLanes<V> > 1) backward_lanes<Act, f32x1>(dy + i, g + i, u + i, dg + i, du + i, n - i);
}

// One chunk (n <= kChunk) in any kernel dtype, for run_widest: float directly, bfloat16/float16
// through float buffers.
template <class Act, class T>
struct ForwardChunk {
  const T *g, *u;
  T* y;
  int64_t n;

  template <class V>
  PACKTUNE_ALWAYS_INLINE void run() const {
    if constexpr (std::is_same_v<T, float>) {
      forward_lanes<Act, V>(g, u, y, n);
    } else {
      float gb[kChunk], ub[kChunk], yb[kChunk];
      load_float(g, gb, n);
      load_float(u, ub, n);
      forward_lanes<Act, V>(gb, ub, yb, n);
      store_float(yb, y, n);
    }
  }
};

template <class Act, class T>
struct BackwardChunk {
  const T *dy, *g, *u;
  T *dg, *du;
  int64_t n;

  template <class V>
  PACKTUNE_ALWAYS_INLINE void run() const {
    if constexpr (std::is_same_v<T, float>) {
      backward_lanes<Act, V>(dy, g, u, dg, du, n);
    } else {
      float db[kChunk], gb[kChunk], ub[kChunk], dgb[kChunk], dub[kChunk];
      load_float(dy, db, n);
      load_float(g, gb, n);
      load_float(u, ub, n);
      backward_lanes<Act, V>(db, gb, ub, dgb, dub, n);
      store_float(dgb, dg, n);
      store_float(dub, du, n);
    }
  }
};

// Calls fn(Act{}, scalar_t{}) for the activation the op names and the tensors' dtype.
template <class Fn>
void dispatch(c10::string_view activation, at::ScalarType dtype, const Fn& fn) {
  const auto with_dtype = [&](auto act) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "packtune.glu",
                                    [&] { fn(act, scalar_t{}); });
  };
  if (activation == "silu") return with_dtype(Silu{});
  if (activation == "gelu_tanh") return with_dtype(GeluTanh{});
  TORCH_CHECK(false, "packtune.glu: activation must be silu or gelu_tanh, got ", activation);
}

// Calls fn(row, col0, len) for every (row, chunk) of an [rows, cols] problem, in parallel.
template <class Fn>
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
  check_kernel_dtype(t, "glu");
  TORCH_CHECK(t.dim() == 2 && t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(),
              "packtune.glu: ", name, " must be [rows, cols] like gate, got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, "packtune.glu: ", name, " needs a unit last stride");
}

at::Tensor glu_fwd(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  check_rows(gate, gate, "gate");
  check_rows(up, gate, "up");
  const int64_t rows = gate.size(0), cols = gate.size(1);
  at::Tensor y = at::empty({rows, cols}, gate.options());
  dispatch(activation, gate.scalar_type(), [&](auto act, auto type) {
    using Act = decltype(act);
    using T = decltype(type);
    const T* g = gate.data_ptr<T>();
    const T* u = up.data_ptr<T>();
    T* out = y.data_ptr<T>();
    const int64_t sg = gate.stride(0), su = up.stride(0);
    for_each_chunk(rows, cols, [&](int64_t r, int64_t c0, int64_t n) {
      run_widest(ForwardChunk<Act, T>{g + r * sg + c0, u + r * su + c0, out + r * cols + c0, n});
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up,
                                           c10::string_view activation) {
  check_rows(gate, gate, "gate");
  check_rows(up, gate, "up");
  check_rows(dy, gate, "dy");
  TORCH_CHECK(dy.is_contiguous(), "packtune.glu: dy must be contiguous");
  const int64_t rows = gate.size(0), cols = gate.size(1);
  at::Tensor dgate = at::empty({rows, cols}, gate.options());
  at::Tensor dup = at::empty({rows, cols}, gate.options());
  dispatch(activation, gate.scalar_type(), [&](auto act, auto type) {
    using Act = decltype(act);
    using T = decltype(type);
    const T* d = dy.data_ptr<T>();
    const T* g = gate.data_ptr<T>();
    const T* u = up.data_ptr<T>();
    T* dg = dgate.data_ptr<T>();
    T* du = dup.data_ptr<T>();
    const int64_t sg = gate.stride(0), su = up.stride(0);
    for_each_chunk(rows, cols, [&](int64_t r, int64_t c0, int64_t n) {
      const int64_t o = r * cols + c0;
      run_widest(BackwardChunk<Act, T>{d + o, g + r * sg + c0, u + r * su + c0, dg + o, du + o, n});
    });
  });
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(packtune, m) {
  m.def("glu_fwd(Tensor gate, Tensor up, str activation) -> Tensor");
  m.def("glu_bwd(Tensor dy, Tensor gate, Tensor up, str activation) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(packtune, CPU, m) {
  m.impl("glu_fwd", &glu_fwd);
  m.impl("glu_bwd", &glu_bwd);
}

}  // namespace packtune
