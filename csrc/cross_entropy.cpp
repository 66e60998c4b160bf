// Fused masked cross-entropy forward+backward for CPU tensors (see kernels/cross_entropy.py for
// the math and the PyTorch specification).
//
//   packtune::cross_entropy_fwd(logits, labels, weights, scale, ...) -> (loss, lse, grad)   grad: new buffer
//   packtune::cross_entropy_fwd_(logits, labels, weights, scale, ...) -> (loss, lse)        grad over logits
//
// `weights` (optional fp32 [N]) multiplies row i's loss and gradient by weights[i]: the row runs
// with scale * weights[i], so the inner loops are the same with or without weights.
// Rows run in parallel (at::parallel_for, OpenMP in torch's CPU builds); a row (128 KB at
// V=32000 fp32) stays in L2, so its passes after the first read cache, not DRAM. The hot loops
// use AVX2+FMA with a polynomial exp (Cephes-style, ~1 ulp), compiled with a target attribute
// and chosen at run time; other CPUs get the scalar loop. fp32 rows without softcap take a
// 3-pass path that stores exp(z - max) and rescales it (one exp per element); bf16 rows and
// softcap recompute the exp in the gradient pass so the gradient is rounded to bf16 only once.
#include "cpu_simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#include <cstdlib>
#endif


namespace {

using at::BFloat16;

struct RowArgs {
  int64_t V;
  float eps, z_loss, softcap, scale;
  bool has_softcap, compute_grad;
};

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) { return static_cast<float>(x); }
template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }  // BFloat16(float) rounds to nearest even

inline float softcap_scalar(float x, const RowArgs& a) {
  return a.has_softcap ? a.softcap * std::tanh(x / a.softcap) : x;
}

// The gradient of one element, given z, lse and the per-row factors.
inline float grad_scalar(float z, float lse, float A, float B, float C_if_label, const RowArgs& a) {
  float g = std::exp(z - lse) * A - B - C_if_label;
  if (a.has_softcap) g *= 1.0f - (z / a.softcap) * (z / a.softcap);
  return g;
}

// Loss of the row from its statistics; also writes the label element's gradient (computed in
// fp32 from the row's own numbers, so the true-class term never cancels in a low-precision buffer).
template <typename T>
inline float finish_row(float m, float s, float sum_z, float z_y, int64_t y, T* g, float* lse_out,
                        const RowArgs& a) {
  const float lse = m + std::log(s);
  *lse_out = lse;
  if (a.compute_grad) {
    const float A = a.scale * (1.0f + 2.0f * a.z_loss * lse);
    g[y] = from_float<T>(grad_scalar(z_y, lse, A, a.scale * a.eps / a.V, a.scale * (1.0f - a.eps), a));
  }
  return lse - (1.0f - a.eps) * z_y - a.eps * sum_z / a.V + a.z_loss * lse * lse;
}

template <typename T>
float row_scalar(const T* x, T* g, int64_t y, float* lse_out, const RowArgs& a) {
  const float z_y = softcap_scalar(to_float(x[y]), a);
  float m = -std::numeric_limits<float>::infinity(), sum_z = 0.0f, s = 0.0f;
  for (int64_t j = 0; j < a.V; ++j) {
    const float z = softcap_scalar(to_float(x[j]), a);
    m = std::max(m, z);
    sum_z += z;
  }
  for (int64_t j = 0; j < a.V; ++j) s += std::exp(softcap_scalar(to_float(x[j]), a) - m);
  const float lse = m + std::log(s);
  if (a.compute_grad) {
    const float A = a.scale * (1.0f + 2.0f * a.z_loss * lse), B = a.scale * a.eps / a.V;
    for (int64_t j = 0; j < a.V; ++j) g[j] = from_float<T>(grad_scalar(softcap_scalar(to_float(x[j]), a), lse, A, B, 0.0f, a));
  }
  return finish_row(m, s, sum_z, z_y, y, g, lse_out, a);
}

#if PACKTUNE_X86
PACKTUNE_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PACKTUNE_AVX2 inline __m256 load8(const BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
PACKTUNE_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
PACKTUNE_AVX2 inline void store8(BFloat16* p, __m256 v) {  // round to nearest even, keep the top 16 bits
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

PACKTUNE_AVX2 inline __m256 softcap8(__m256 x, const RowArgs& a) {
  if (!a.has_softcap) return x;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 u = _mm256_div_ps(x, _mm256_set1_ps(a.softcap));
  const __m256 e = packtune::exp256(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(sign, u)));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  return _mm256_mul_ps(_mm256_set1_ps(a.softcap), _mm256_or_ps(t, _mm256_and_ps(u, sign)));
}

PACKTUNE_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
PACKTUNE_AVX2 inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

template <typename T>
PACKTUNE_AVX2 float row_avx2(const T* x, T* g, int64_t y, float* lse_out, const RowArgs& a) {
  const int64_t V = a.V, Vv = V - V % 8;
  const float z_y = softcap_scalar(to_float(x[y]), a);
  // Pass 1: max and sum of z.
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), vsum = _mm256_setzero_ps();
  for (int64_t j = 0; j < Vv; j += 8) {
    const __m256 z = softcap8(load8(x + j), a);
    vmax = _mm256_max_ps(vmax, z);
    vsum = _mm256_add_ps(vsum, z);
  }
  float m = hmax8(vmax), sum_z = hsum8(vsum);
  for (int64_t j = Vv; j < V; ++j) {
    const float z = softcap_scalar(to_float(x[j]), a);
    m = std::max(m, z);
    sum_z += z;
  }
  const __m256 vm = _mm256_set1_ps(m);
  // fp32 without softcap: store e = exp(z - m) in the gradient row, rescale it in pass 3.
  const bool store_exp = a.compute_grad && std::is_same<T, float>::value && !a.has_softcap;
  // Pass 2: s = sum exp(z - m).
  __m256 vs = _mm256_setzero_ps();
  float s = 0.0f;
  for (int64_t j = 0; j < Vv; j += 8) {
    const __m256 e = packtune::exp256(_mm256_sub_ps(softcap8(load8(x + j), a), vm));
    if (store_exp) store8(g + j, e);
    vs = _mm256_add_ps(vs, e);
  }
  for (int64_t j = Vv; j < V; ++j) {
    const float e = std::exp(softcap_scalar(to_float(x[j]), a) - m);
    if (store_exp) g[j] = from_float<T>(e);
    s += e;
  }
  s += hsum8(vs);
  // Pass 3: the gradient (the label element is overwritten by finish_row).
  if (a.compute_grad) {
    const float lse = m + std::log(s);
    const float A = a.scale * (1.0f + 2.0f * a.z_loss * lse), B = a.scale * a.eps / V;
    const __m256 vB = _mm256_set1_ps(B);
    if (store_exp) {
      const __m256 vA = _mm256_set1_ps(A / s);
      for (int64_t j = 0; j < Vv; j += 8) store8(g + j, _mm256_fmsub_ps(load8(g + j), vA, vB));
      for (int64_t j = Vv; j < V; ++j) g[j] = from_float<T>(to_float(g[j]) * (A / s) - B);
    } else {
      const __m256 vA = _mm256_set1_ps(A), vlse = _mm256_set1_ps(lse), one = _mm256_set1_ps(1.0f);
      const __m256 inv_cap = _mm256_set1_ps(a.has_softcap ? 1.0f / a.softcap : 0.0f);
      for (int64_t j = 0; j < Vv; j += 8) {
        const __m256 z = softcap8(load8(x + j), a);
        __m256 gv = _mm256_fmsub_ps(packtune::exp256(_mm256_sub_ps(z, vlse)), vA, vB);
        if (a.has_softcap) {
          const __m256 t = _mm256_mul_ps(z, inv_cap);
          gv = _mm256_mul_ps(gv, _mm256_fnmadd_ps(t, t, one));
        }
        store8(g + j, gv);
      }
      for (int64_t j = Vv; j < V; ++j) g[j] = from_float<T>(grad_scalar(softcap_scalar(to_float(x[j]), a), lse, A, B, 0.0f, a));
    }
  }
  return finish_row(m, s, sum_z, z_y, y, g, lse_out, a);
}

#endif

template <typename T>
void run_rows(const at::Tensor& logits, const at::Tensor& labels, const float* w, T* grad, int64_t grad_stride,
              float* loss, float* lse, const RowArgs& args, int64_t ignore_index) {
  const T* x = logits.data_ptr<T>();
  const int64_t x_stride = logits.stride(0), N = logits.size(0);
  const int64_t* lab = labels.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    RowArgs a = args;
    for (int64_t i = begin; i < end; ++i) {
      const float wi = w ? w[i] : 1.0f;
      if (w) a.scale = args.scale * wi;
      const int64_t y = lab[i];
      T* g = grad ? grad + i * grad_stride : nullptr;
      if (y == ignore_index) {  // every output slot is written; in place this zeroes the row
        loss[i] = 0.0f;
        lse[i] = 0.0f;
        if (g) std::fill(g, g + a.V, from_float<T>(0.0f));
        continue;
      }
      TORCH_CHECK(y >= 0 && y < a.V, "packtune cross_entropy: label ", y, " at row ", i,
                  " is outside the vocabulary [0, ", a.V, ") and is not ignore_index (", ignore_index, ")");
#if PACKTUNE_X86
      if (packtune::cpu_has_avx2()) {
        loss[i] = wi * row_avx2<T>(x + i * x_stride, g, y, lse + i, a);
        continue;
      }
#endif
      loss[i] = wi * row_scalar<T>(x + i * x_stride, g, y, lse + i, a);
    }
  });
}

void check_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor* weights,
                  const at::Tensor& scale) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), "packtune cross_entropy: CPU tensors only");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "packtune cross_entropy: logits must be [N, V] with unit column stride");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "packtune cross_entropy: logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == logits.size(0),
              "packtune cross_entropy: labels must be int64 [N] matching logits");
  TORCH_CHECK(scale.numel() == 1, "packtune cross_entropy: scale must hold one value");
  TORCH_CHECK(!weights || (weights->scalar_type() == at::kFloat && weights->dim() == 1 &&
                           weights->size(0) == logits.size(0) && weights->device().is_cpu()),
              "packtune cross_entropy: weights must be float32 [N] matching logits");
}

std::vector<at::Tensor> forward(const at::Tensor& logits, const at::Tensor& labels_in,
                                const std::optional<at::Tensor>& weights_in, const at::Tensor& scale,
                                int64_t ignore_index, double eps, double z_loss, double softcap,
                                bool compute_grad, const at::Tensor* grad) {
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor weights = weights_in ? weights_in->contiguous() : at::Tensor();
  check_inputs(logits, labels, weights.defined() ? &weights : nullptr, scale);
  const float* w = weights.defined() ? weights.data_ptr<float>() : nullptr;
  const int64_t N = logits.size(0);
  at::Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({N}, logits.options().dtype(at::kFloat));
  RowArgs a{logits.size(1), float(eps), float(z_loss), float(softcap),
            scale.to(at::kFloat).item<float>(), softcap > 0, compute_grad};
  AT_DISPATCH_SWITCH(logits.scalar_type(), "packtune_cross_entropy",
      AT_DISPATCH_CASE(at::kFloat, [&] {
        run_rows<scalar_t>(logits, labels, w, grad ? grad->data_ptr<scalar_t>() : nullptr, grad ? grad->stride(0) : 0,
                           loss.data_ptr<float>(), lse.data_ptr<float>(), a, ignore_index);
      })
      AT_DISPATCH_CASE(at::kBFloat16, [&] {
        run_rows<scalar_t>(logits, labels, w, grad ? grad->data_ptr<scalar_t>() : nullptr, grad ? grad->stride(0) : 0,
                           loss.data_ptr<float>(), lse.data_ptr<float>(), a, ignore_index);
      }));
  return {loss, lse};
}

// A new N x V gradient buffer. Large ones are backed by transparent huge pages where the kernel
// offers them on request (THP "madvise" mode): first-touch page faults on a fresh 4 KiB-paged
// buffer otherwise cost more than the kernel itself (~250 ms for 2048 x 32000 fp32 here).
at::Tensor new_grad_buffer(const at::Tensor& logits) {
  const int64_t n = logits.size(0), v = logits.size(1);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = size_t(n) * size_t(v) * logits.element_size();
  if (bytes >= 16 * kHuge) {
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHuge, (bytes + kHuge - 1) / kHuge * kHuge) == 0) {
      madvise(ptr, bytes, MADV_HUGEPAGE);
      return at::from_blob(ptr, {n, v}, [](void* p) { std::free(p); }, logits.options());
    }
  }
#endif
  return at::empty({n, v}, logits.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(
    const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& weights,
    const at::Tensor& scale, int64_t ignore_index, double eps, double z_loss, double softcap, bool compute_grad) {
  at::Tensor grad = compute_grad ? new_grad_buffer(logits) : at::empty({0}, logits.options());
  auto out = forward(logits, labels, weights, scale, ignore_index, eps, z_loss, softcap, compute_grad,
                     compute_grad ? &grad : nullptr);
  return {out[0], out[1], grad};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_(
    at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& weights,
    const at::Tensor& scale, int64_t ignore_index, double eps, double z_loss, double softcap) {
  auto out = forward(logits, labels, weights, scale, ignore_index, eps, z_loss, softcap, true, &logits);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(packtune, m) {
  m.def("cross_entropy_fwd(Tensor logits, Tensor labels, Tensor? weights, Tensor scale, int ignore_index, "
        "float label_smoothing, float z_loss, float softcap, bool compute_grad) -> (Tensor loss, Tensor lse, Tensor grad)");
  m.def("cross_entropy_fwd_(Tensor(a!) logits, Tensor labels, Tensor? weights, Tensor scale, int ignore_index, "
        "float label_smoothing, float z_loss, float softcap) -> (Tensor loss, Tensor lse)");
}

TORCH_LIBRARY_IMPL(packtune, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_fwd_", &cross_entropy_fwd_);
}
