// Mixture-of-experts expert block on CPU, forward and backward (see kernels/moe.py for the math
// and the weight layouts).
//
// The (token, expert) pairs arrive sorted by expert: expert e owns sorted rows [ends[e-1], ends[e]).
// Each expert is one task: gather its tokens' rows, then a chain of BLAS GEMMs on them (at::mm_out
// into slices of the outputs, any weight orientation through strides) with the gated activation,
// biases and routing weights in fused loops between them. Tasks run in parallel over the CPU
// threads, largest first, each thread taking the next (one parallel region per call: per-expert
// GEMMs that each spread over all threads pay a barrier per GEMM, which small experts cannot
// amortise); an expert holding more than a thread's share of the rows runs alone first, its GEMMs
// on every thread. Experts write disjoint rows of a sorted buffer and disjoint weight-gradient
// slices, so nothing races; the un-permute then sums each token's k rows, in opmath, in parallel
// over tokens (deterministic).
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include "cpu_simd.h"

namespace packtune {
namespace {

// h = g' sigmoid(alpha g') (u' + shift), g' = min(g, limit), u' = clamp(u, -limit, limit), and its
// gradients with respect to the unclamped g and u (zero where a clamp is active, as torch.clamp).
template <typename T>
struct GatedActivation {
  T alpha, limit, shift;

  T forward(T g, T u) const {
    const T gc = std::min(g, limit), uc = std::min(std::max(u, -limit), limit);
    return gc / (T(1) + std::exp(-alpha * gc)) * (uc + shift);
  }

  // h and, for dh, the gradients dg and du (one exp for the three).
  T backward(T dh, T g, T u, T* dg, T* du) const {
    const T gc = std::min(g, limit), uc = std::min(std::max(u, -limit), limit);
    const T s = T(1) / (T(1) + std::exp(-alpha * gc));
    *dg = g <= limit ? dh * (uc + shift) * (s + alpha * gc * s * (T(1) - s)) : T(0);
    *du = (u >= -limit && u <= limit) ? dh * gc * s : T(0);
    return gc * s * (uc + shift);
  }
};

// Column of gate and up for h's column j in a [rows, 2I] gate/up row.
struct GateUpColumns {
  bool interleaved;
  int64_t inter;
  int64_t gate(int64_t j) const { return interleaved ? 2 * j : j; }
  int64_t up(int64_t j) const { return interleaved ? 2 * j + 1 : inter + j; }
};

// fn(e) for every expert (see the file comment for the schedule). Each thread runs its ATen calls
// below autograd (the guard is thread-local: pool threads would otherwise record autograd history).
template <typename Fn>
void for_each_expert(const at::Tensor& ends, const Fn& task) {
  auto fn = [&](int64_t e) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    task(e);
  };
  const int64_t* end = ends.data_ptr<int64_t>();
  const int64_t experts = ends.size(0), rows = experts ? end[experts - 1] : 0;
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> shared;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t n = end[e] - (e ? end[e - 1] : 0);
    if (threads > 1 && n * threads > rows) {
      fn(e);
    } else {
      shared.push_back(e);
    }
  }
  auto size = [&](int64_t e) { return end[e] - (e ? end[e - 1] : 0); };
  std::stable_sort(shared.begin(), shared.end(), [&](int64_t a, int64_t b) { return size(a) > size(b); });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < static_cast<int64_t>(shared.size()); i = next++) fn(shared[i]);
  });
}

// out[t] = sum over j < k of rows[position[t k + j]], in opmath: the un-permute.
template <typename scalar_t>
void unpermute(const at::Tensor& rows, const at::Tensor& position, at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t tokens = out.size(0), hidden = out.size(1), k = tokens ? position.size(0) / tokens : 0;
  const scalar_t* src = rows.data_ptr<scalar_t>();
  const int64_t* pos = position.data_ptr<int64_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> acc(hidden);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), opmath_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const scalar_t* row = src + pos[t * k + j] * hidden;
        for (int64_t c = 0; c < hidden; ++c) acc[c] += static_cast<opmath_t>(row[c]);
      }
      for (int64_t c = 0; c < hidden; ++c) dst[t * hidden + c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

struct Experts {
  at::Tensor gate_up, down;  // in-by-out views [E, H, 2I], [E, I, H]
  at::Tensor gate_up_bias, down_bias;  // contiguous, or undefined
  GateUpColumns columns;
};

Experts experts_of(const at::Tensor& gate_up, const c10::optional<at::Tensor>& gate_up_bias,
                   const at::Tensor& down, const c10::optional<at::Tensor>& down_bias, bool transposed,
                   bool interleaved) {
  Experts ex;
  ex.gate_up = transposed ? gate_up : gate_up.transpose(1, 2);
  ex.down = transposed ? down : down.transpose(1, 2);
  if (gate_up_bias.has_value()) ex.gate_up_bias = gate_up_bias->contiguous();
  if (down_bias.has_value()) ex.down_bias = down_bias->contiguous();
  ex.columns = {interleaved, ex.down.size(1)};
  return ex;
}

void check_inputs(const at::Tensor& x, const at::Tensor& token, const at::Tensor& ends,
                  const at::Tensor& position, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "packtune.moe_experts: x must be a CPU [T, H] tensor");
  for (const at::Tensor* t : {&token, &ends, &position})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(),
                "packtune.moe_experts: the routing tensors must be contiguous int64");
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weight.scalar_type() == opmath && weight.is_contiguous(),
              "packtune.moe_experts: the sorted routing weights must be contiguous ", opmath);
}

std::tuple<at::Tensor, at::Tensor> moe_experts_fwd(
    const at::Tensor& x, const at::Tensor& token, const at::Tensor& ends, const at::Tensor& position,
    const at::Tensor& weight, const at::Tensor& gate_up, const c10::optional<at::Tensor>& gate_up_bias,
    const at::Tensor& down, const c10::optional<at::Tensor>& down_bias, bool transposed, bool interleaved,
    double alpha, double limit, double up_shift, bool save) {
  check_inputs(x, token, ends, position, weight);
  const Experts ex = experts_of(gate_up, gate_up_bias, down, down_bias, transposed, interleaved);
  const int64_t rows = token.size(0), hidden = x.size(1), inter = ex.down.size(1);
  at::Tensor gu = at::empty({save ? rows : 0, 2 * inter}, x.options());
  at::Tensor y = at::empty({rows, hidden}, x.options());  // sorted rows, weighted
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_experts_fwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const GatedActivation<opmath_t> act{opmath_t(alpha), opmath_t(limit), opmath_t(up_shift)};
    const int64_t* end = ends.data_ptr<int64_t>();
    const opmath_t* w = weight.data_ptr<opmath_t>();
    for_each_expert(ends, [&](int64_t e) {
      const int64_t r0 = e ? end[e - 1] : 0, n = end[e] - r0;
      if (n == 0) return;
      at::Tensor xs = x.index_select(0, token.slice(0, r0, r0 + n));
      at::Tensor gu_e = save ? gu.slice(0, r0, r0 + n) : at::empty({n, 2 * inter}, x.options());
      at::mm_out(gu_e, xs, ex.gate_up[e]);
      at::Tensor h = at::empty({n, inter}, x.options());
      scalar_t* g = gu_e.data_ptr<scalar_t>();
      scalar_t* hp = h.data_ptr<scalar_t>();
      const scalar_t* b = ex.gate_up_bias.defined() ? ex.gate_up_bias[e].data_ptr<scalar_t>() : nullptr;
      for (int64_t r = 0; r < n; ++r) {
        scalar_t* row = g + r * 2 * inter;
        if (b)
          for (int64_t c = 0; c < 2 * inter; ++c)
            row[c] = static_cast<scalar_t>(static_cast<opmath_t>(row[c]) + static_cast<opmath_t>(b[c]));
        for (int64_t j = 0; j < inter; ++j)
          hp[r * inter + j] = static_cast<scalar_t>(act.forward(row[ex.columns.gate(j)], row[ex.columns.up(j)]));
      }
      at::Tensor y_e = y.slice(0, r0, r0 + n);
      at::mm_out(y_e, h, ex.down[e]);
      scalar_t* yp = y_e.data_ptr<scalar_t>();
      const scalar_t* bd = ex.down_bias.defined() ? ex.down_bias[e].data_ptr<scalar_t>() : nullptr;
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < hidden; ++c) {
          const opmath_t v = static_cast<opmath_t>(yp[r * hidden + c]) + (bd ? static_cast<opmath_t>(bd[c]) : 0);
          yp[r * hidden + c] = static_cast<scalar_t>(v * w[r0 + r]);
        }
    });
    unpermute<scalar_t>(y, position, out);
  });
  return {out, gu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_bwd(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& token, const at::Tensor& ends,
    const at::Tensor& position, const at::Tensor& weight, const at::Tensor& gu, const at::Tensor& gate_up,
    const c10::optional<at::Tensor>& gate_up_bias, const at::Tensor& down,
    const c10::optional<at::Tensor>& down_bias, bool transposed, bool interleaved, double alpha, double limit,
    double up_shift, bool need_dx, bool need_weights) {
  check_inputs(x, token, ends, position, weight);
  const at::Tensor dy = dy_in.contiguous();
  const Experts ex = experts_of(gate_up, gate_up_bias, down, down_bias, transposed, interleaved);
  const int64_t rows = token.size(0), hidden = x.size(1), inter = ex.down.size(1);
  TORCH_CHECK(gu.is_contiguous() && gu.size(0) == rows && gu.size(1) == 2 * inter,
              "packtune.moe_experts: the saved gate/up rows must be contiguous [rows, 2I]");
  auto grad = [&](const at::Tensor& like, bool needed) {
    return needed && like.defined() ? at::empty_like(like, at::MemoryFormat::Contiguous) : x.new_empty({0});
  };
  at::Tensor dweight = at::empty_like(weight);
  at::Tensor dx_rows = at::empty({need_dx ? rows : 0, hidden}, x.options());
  at::Tensor dgate_up = grad(gate_up, need_weights), ddown = grad(down, need_weights);
  at::Tensor dgate_up_bias = grad(ex.gate_up_bias, need_weights), ddown_bias = grad(ex.down_bias, need_weights);
  at::Tensor dgu_io = need_weights ? (transposed ? dgate_up : dgate_up.transpose(1, 2)) : dgate_up;
  at::Tensor ddown_io = need_weights ? (transposed ? ddown : ddown.transpose(1, 2)) : ddown;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_experts_bwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const GatedActivation<opmath_t> act{opmath_t(alpha), opmath_t(limit), opmath_t(up_shift)};
    const int64_t* end = ends.data_ptr<int64_t>();
    const opmath_t* w = weight.data_ptr<opmath_t>();
    opmath_t* dw = dweight.data_ptr<opmath_t>();
    for_each_expert(ends, [&](int64_t e) {
      const int64_t r0 = e ? end[e - 1] : 0, n = end[e] - r0;
      const scalar_t* bd = ex.down_bias.defined() ? ex.down_bias[e].data_ptr<scalar_t>() : nullptr;
      if (n == 0) {
        if (need_weights) {
          dgu_io[e].zero_();
          ddown_io[e].zero_();
          if (bd) ddown_bias[e].zero_();
          if (ex.gate_up_bias.defined()) dgate_up_bias[e].zero_();
        }
        return;
      }
      const at::Tensor tok = token.slice(0, r0, r0 + n);
      const at::Tensor dys = dy.index_select(0, tok);
      at::Tensor hw = at::mm(dys, ex.down[e].t());  // dh / w first, then h * w in place
      at::Tensor dgu = at::empty({n, 2 * inter}, x.options());
      const scalar_t* g = gu.data_ptr<scalar_t>() + r0 * 2 * inter;
      const scalar_t* d = dys.data_ptr<scalar_t>();
      scalar_t* hp = hw.data_ptr<scalar_t>();
      scalar_t* dg = dgu.data_ptr<scalar_t>();
      for (int64_t r = 0; r < n; ++r) {
        const opmath_t wr = w[r0 + r];
        opmath_t dwr = 0;
        for (int64_t j = 0; j < inter; ++j) {
          const int64_t cg = ex.columns.gate(j), cu = ex.columns.up(j);
          const opmath_t gv = g[r * 2 * inter + cg], uv = g[r * 2 * inter + cu];
          const opmath_t dh = static_cast<opmath_t>(hp[r * inter + j]);
          opmath_t dgate, dup;
          const opmath_t h = act.backward(dh * wr, gv, uv, &dgate, &dup);
          dwr += dh * h;
          dg[r * 2 * inter + cg] = static_cast<scalar_t>(dgate);
          dg[r * 2 * inter + cu] = static_cast<scalar_t>(dup);
          hp[r * inter + j] = static_cast<scalar_t>(h * wr);
        }
        if (bd)
          for (int64_t c = 0; c < hidden; ++c)
            dwr += static_cast<opmath_t>(d[r * hidden + c]) * static_cast<opmath_t>(bd[c]);
        dw[r0 + r] = dwr;
      }
      if (need_weights) {
        at::Tensor ddown_e = ddown_io[e];
        at::mm_out(ddown_e, hw.t(), dys);
        at::Tensor dgu_e = dgu_io[e];
        at::mm_out(dgu_e, x.index_select(0, tok).t(), dgu);
        if (bd) {
          scalar_t* db = ddown_bias[e].data_ptr<scalar_t>();
          for (int64_t c = 0; c < hidden; ++c) {
            opmath_t acc = 0;
            for (int64_t r = 0; r < n; ++r) acc += w[r0 + r] * static_cast<opmath_t>(d[r * hidden + c]);
            db[c] = static_cast<scalar_t>(acc);
          }
        }
        if (ex.gate_up_bias.defined()) {
          scalar_t* db = dgate_up_bias[e].data_ptr<scalar_t>();
          for (int64_t c = 0; c < 2 * inter; ++c) {
            opmath_t acc = 0;
            for (int64_t r = 0; r < n; ++r) acc += static_cast<opmath_t>(dg[r * 2 * inter + c]);
            db[c] = static_cast<scalar_t>(acc);
          }
        }
      }
      if (need_dx) {
        at::Tensor dx_e = dx_rows.slice(0, r0, r0 + n);
        at::mm_out(dx_e, dgu, ex.gate_up[e].t());
      }
    });
  });
  at::Tensor dx = need_dx ? at::empty_like(x, at::MemoryFormat::Contiguous) : x.new_empty({0});
  if (need_dx) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_experts_unpermute",
                                    [&] { unpermute<scalar_t>(dx_rows, position, dx); });
  }
  return {dx, dweight, dgate_up, dgate_up_bias, ddown, ddown_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(packtune, m) {
  m.def(
      "moe_experts_fwd(Tensor x, Tensor token, Tensor ends, Tensor position, Tensor weight, Tensor gate_up, "
      "Tensor? gate_up_bias, Tensor down, Tensor? down_bias, bool transposed, bool interleaved, float alpha, "
      "float limit, float up_shift, bool save) -> (Tensor, Tensor)");
  m.def(
      "moe_experts_bwd(Tensor dy, Tensor x, Tensor token, Tensor ends, Tensor position, Tensor weight, "
      "Tensor gu, Tensor gate_up, Tensor? gate_up_bias, Tensor down, Tensor? down_bias, bool transposed, "
      "bool interleaved, float alpha, float limit, float up_shift, bool need_dx, bool need_weights) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(packtune, CPU, m) {
  m.impl("moe_experts_fwd", &moe_experts_fwd);
  m.impl("moe_experts_bwd", &moe_experts_bwd);
}

}  // namespace packtune
