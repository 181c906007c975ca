// The sliding update of a SLIM layer's clusters (docs/method.md §2), in place, in one call:
// what slim_kernels/ops/ema.py's torch version computes with a dozen small ops.
//
// stats (C, 2K + 3), fp32 or fp64: per cluster j, [n, S1 = Σ(x - c_j), S2 = Σ(x - c_j)²,
// R1 = Σ r, R2 = Σ r²] of the kept tokens routed to j (the SLIM op's statistics, all-reduced
// under data parallelism). If every entry is finite, for each cluster with n > 0:
//   δ = S1 / n,  var = max(S2 / n - δ², 0),  c += mom δ,  v += mom (var - v);
// and with the distance statistics (mu, sigma² of r, where the op's r is r / sigma):
//   N = Σ n,  m = R1 / N,  s = max(R2 / N - m², 0),  sigma² = distance_var + eps,
//   mu += mom (m sigma - mu),  distance_var += mom (s sigma² - distance_var)   (if N > 0).
// Then the routing tensors: inv_std = 1 / sqrt(v + eps) and shift = 1, with the distance
// statistics inv_std / sqrt(distance_var + eps) and shift = mu / sqrt(distance_var + eps)
// (the same fp32 arithmetic as slim_kernels/ops/ema.py::refresh_routing_: bit-identical).
// Otherwise nothing changes and rejected += 1.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace slim_cpu {
namespace {

template <typename acc_t>
void ema_impl(float* c, float* v, const acc_t* S, int64_t C, int64_t K, double momentum,
              float* dmean, float* dvar, float* inv_std, float* shift, double eps,
              int64_t* rejected) {
  const int64_t L = 2 * K + 3;
  for (int64_t i = 0; i < C * L; ++i) {
    if (!std::isfinite(S[i])) {
      *rejected += 1;
      return;
    }
  }
  const acc_t mom = static_cast<acc_t>(momentum);
  acc_t count = 0, r1 = 0, r2 = 0;
  for (int64_t j = 0; j < C; ++j) {
    const acc_t* row = S + j * L;
    const acc_t n = row[0];
    if (!(n > 0)) continue;
    count += n;
    r1 += row[2 * K + 1];
    r2 += row[2 * K + 2];
    const acc_t inv = acc_t(1) / n;
    float* cj = c + j * K;
    float* vj = v + j * K;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t d = row[1 + k] * inv;
      const acc_t var = std::max(row[1 + K + k] * inv - d * d, acc_t(0));
      cj[k] = static_cast<float>(cj[k] + mom * d);
      vj[k] = static_cast<float>(vj[k] + mom * (var - static_cast<acc_t>(vj[k])));
    }
  }
  if (dmean != nullptr && count > 0) {
    const acc_t m = r1 / count;
    const acc_t s = std::max(r2 / count - m * m, acc_t(0));
    const acc_t sigma2 = static_cast<acc_t>(*dvar) + static_cast<acc_t>(eps);
    const acc_t mu = static_cast<acc_t>(*dmean);
    *dmean = static_cast<float>(mu + mom * (m * std::sqrt(sigma2) - mu));
    *dvar = static_cast<float>(*dvar + mom * (s * sigma2 - static_cast<acc_t>(*dvar)));
  }
  const float feps = static_cast<float>(eps);
  float sigma = 1.0f, sh = 1.0f;
  if (dmean != nullptr) {
    sigma = std::sqrt(*dvar + feps);
    sh = *dmean / sigma;
  }
  for (int64_t i = 0; i < C * K; ++i) {
    const float r = 1.0f / std::sqrt(v[i] + feps);
    inv_std[i] = dmean != nullptr ? r / sigma : r;
  }
  for (int64_t j = 0; j < C; ++j) shift[j] = sh;
}

void cluster_ema_(at::Tensor& centers, at::Tensor& variances, at::Tensor& rejected,
                  const at::Tensor& stats, double momentum,
                  const c10::optional<at::Tensor>& distance_mean,
                  const c10::optional<at::Tensor>& distance_var, at::Tensor& inv_std,
                  at::Tensor& shift, double eps) {
  const int64_t C = centers.size(0), K = centers.size(1);
  TORCH_CHECK(centers.device().is_cpu(), "cluster_ema_: CPU tensors");
  TORCH_CHECK(centers.scalar_type() == at::kFloat && variances.scalar_type() == at::kFloat &&
                  centers.is_contiguous() && variances.is_contiguous() &&
                  variances.sizes() == centers.sizes(),
              "cluster_ema_: centers and variances must be contiguous fp32 (C, K)");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == C && stats.size(1) == 2 * K + 3 &&
                  stats.is_contiguous(),
              "cluster_ema_: stats must be contiguous (C, 2K + 3)");
  TORCH_CHECK(rejected.scalar_type() == at::kLong && rejected.numel() == 1,
              "cluster_ema_: rejected must be one int64");
  TORCH_CHECK(inv_std.scalar_type() == at::kFloat && inv_std.is_contiguous() &&
                  inv_std.sizes() == centers.sizes() && shift.scalar_type() == at::kFloat &&
                  shift.is_contiguous() && shift.numel() == C,
              "cluster_ema_: inv_std (C, K) and shift (C,) must be contiguous fp32");
  TORCH_CHECK(distance_mean.has_value() == distance_var.has_value(),
              "cluster_ema_: distance_mean and distance_var go together");
  float* dm = nullptr;
  float* dv = nullptr;
  if (distance_mean.has_value()) {
    TORCH_CHECK(distance_mean->scalar_type() == at::kFloat && distance_mean->numel() == 1 &&
                    distance_var->scalar_type() == at::kFloat && distance_var->numel() == 1,
                "cluster_ema_: distance_mean / distance_var must be fp32 scalars");
    dm = distance_mean->data_ptr<float>();
    dv = distance_var->data_ptr<float>();
  }
  float* c = centers.data_ptr<float>();
  float* v = variances.data_ptr<float>();
  int64_t* rej = rejected.data_ptr<int64_t>();
  if (stats.scalar_type() == at::kDouble) {
    ema_impl<double>(c, v, stats.data_ptr<double>(), C, K, momentum, dm, dv,
                     inv_std.data_ptr<float>(), shift.data_ptr<float>(), eps, rej);
  } else {
    TORCH_CHECK(stats.scalar_type() == at::kFloat, "cluster_ema_: stats must be fp32 or fp64");
    ema_impl<float>(c, v, stats.data_ptr<float>(), C, K, momentum, dm, dv,
                    inv_std.data_ptr<float>(), shift.data_ptr<float>(), eps, rej);
  }
}

}  // namespace
}  // namespace slim_cpu

TORCH_LIBRARY_FRAGMENT(slim_kernels_C, m) {
  m.def(
      "cluster_ema_(Tensor(a!) centers, Tensor(b!) variances, Tensor(c!) rejected, "
      "Tensor stats, float momentum, Tensor(d!)? distance_mean, Tensor(e!)? distance_var, "
      "Tensor(f!) inv_std, Tensor(g!) shift, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(slim_kernels_C, CPU, m) { m.impl("cluster_ema_", &slim_cpu::cluster_ema_); }
