// packtune._C: the Python module that loads the CPU kernels.
//
// Each op lives in its own csrc/<op>.cpp and registers itself with
// TORCH_LIBRARY_FRAGMENT(packtune, m), so it is called as torch.ops.packtune.<name>
// once this module is imported. This file only carries the facts `packtune env` reports.
#include <torch/extension.h>

#include "cpu_simd.h"

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
  if (packtune::cpu_has_avx512()) return "avx512";
  if (packtune::cpu_has_avx2()) return "avx2";
  return "default";
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "packtune CPU kernels (ops registered under torch.ops.packtune)";
  m.def("openmp_max_threads", &openmp_max_threads,
        "OpenMP threads the kernels will use (0 when built without OpenMP)");
  m.def("cpu_capability", &cpu_capability,
        "SIMD level the kernels run at: avx512, avx2 or default (capped by ATEN_CPU_CAPABILITY)");
}
