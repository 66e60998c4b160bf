// packtune._C: the Python module that loads the CPU kernels.
//
// Each op lives in its own csrc/<op>.cpp and registers itself with
// TORCH_LIBRARY_FRAGMENT(packtune, m), so it is called as torch.ops.packtune.<name>
// once this module is imported. This file only carries the facts `packtune env` reports.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

static std::string cpu_capability() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
  return "default";
#else
  return "default";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "packtune CPU kernels (ops registered under torch.ops.packtune)";
  m.def("openmp_max_threads", &openmp_max_threads,
        "OpenMP threads the kernels will use (0 when built without OpenMP)");
  m.def("cpu_capability", &cpu_capability,
        "Best SIMD level this CPU offers to the kernels: avx512, avx2 or default");
}
