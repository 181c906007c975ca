// Host binding of the CUDA backend: the GEMMs through ATen (cuBLAS), the route epilogues
// through the torch-free kernels of slim_route.cu. Built only into a CUDA extension
// (setup.py, SLIM_KERNELS_WITH_CUDA).
//
// Forward:  [h | z] = x [A_all; R]ᵀ (one GEMM; two when x_lora is given)
//           route_forward -> gates, idx, d, assign, h (acc), hg = s g ⊙ h
//           (d = r - distance_shift[j*], or r - 1 without a shift; with cluster_stats also
//           j* of each kept token and r, the statistics' per-token input)
//           y = x Wᵀ + b, then y += hg B_allᵀ into the same output (addmm_, beta = 1)
//           cluster_stats (when asked for) -> the (C, 2K + 3) statistics: a second pass
//           over x, per token group; the group partials summed in order (at::sum)
// Backward: dhg = dy B_all;  route_backward -> dz, dh, hg
//           dB = dyᵀ hg, dA = dhᵀ x_lora, dR = dzᵀ x, dx = dy W + dz R (+ dh A_all)
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "slim_cuda.h"

namespace slim_cuda {
namespace {

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "slim_kernels_C (cuda): unsupported dtype ", t);
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "slim_kernels_C (cuda): ", what, " failed: ",
              cudaGetErrorString(err));
}

std::vector<at::Tensor> cuda_forward(const at::Tensor& x_, const c10::optional<at::Tensor>& x_lora,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& lora_A_, const at::Tensor& lora_B_,
                                     const at::Tensor& router_,
                                     const c10::optional<at::Tensor>& centers,
                                     const c10::optional<at::Tensor>& inv_std,
                                     const c10::optional<at::Tensor>& distance_shift,
                                     int64_t EL, int64_t top_k, double scaling,
                                     double yield_strength, int64_t reduce, int64_t /*mode*/,
                                     const c10::optional<at::Tensor>& stats_keep,
                                     bool stats_wanted) {
  TORCH_CHECK(x_.is_cuda(), "slim_kernels_C.cuda_forward: x must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto A = lora_A_.contiguous();
  auto B = lora_B_.contiguous();
  auto Rw = router_.contiguous();
  const int64_t T = x.size(0), K = x.size(1), E = Rw.size(0), R = A.size(0);
  TORCH_CHECK(EL >= 1 && R % EL == 0, "lora_A rows must be num_lora_experts x rank");
  TORCH_CHECK(E <= kMaxExperts, "the cuda backend handles at most ", kMaxExperts, " experts");
  TORCH_CHECK(reduce >= 0 && reduce <= 2, "reduce must be 0 (max), 1 (mean), 2 (rms)");
  const int64_t r = R / EL;
  auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto aopt = x.options().dtype(acc);
  at::Tensor hz, h_in, z_in;
  int64_t ld_h, ld_z;
  if (x_lora.has_value()) {
    h_in = at::mm(x_lora->contiguous(), A.t());
    z_in = at::mm(x, Rw.t());
    ld_h = R;
    ld_z = E;
  } else {
    hz = at::mm(x, at::cat({A, Rw}, 0).t());  // one pass over x for both products
    h_in = hz;
    z_in = hz;
    ld_h = ld_z = R + E;
  }
  const bool clusters = centers.has_value() && centers->size(0) > 0;
  at::Tensor c, s, sh;
  if (clusters) {
    c = centers->to(x.device(), at::kFloat).contiguous();
    s = inv_std->to(x.device(), at::kFloat).contiguous();
    if (distance_shift.has_value()) {
      // read through its stride (the layer passes one value expanded: stride 0)
      sh = distance_shift->to(x.device(), at::kFloat);
      TORCH_CHECK(sh.dim() == 1 && sh.size(0) == c.size(0), "distance_shift must be (C,)");
    }
  }
  auto h = at::empty({T, R}, aopt);
  auto gates = at::empty({T, E}, aopt);
  auto idx = at::empty({T, top_k}, x.options().dtype(at::kLong));
  auto dist = at::empty({T}, aopt);
  auto assign = at::empty({T}, x.options().dtype(at::kLong));
  auto hg = at::empty({T, R}, x.options());
  // the statistics' per-token input: j* of a kept token (else -1) and r before the shift
  const bool want_stats = stats_wanted && clusters;
  at::Tensor keep, stats_j, stats_r;
  if (want_stats) {
    if (stats_keep.has_value()) {
      TORCH_CHECK(stats_keep->dim() == 1 && stats_keep->size(0) == T &&
                      stats_keep->scalar_type() == at::kBool,
                  "slim_kernels_C.cuda_forward: stats_keep must be a (T,) bool tensor");
      // read through its stride, as bytes
      keep = stats_keep->to(x.device()).view(at::kByte);
    }
    stats_j = at::empty({T}, x.options().dtype(at::kInt));
    stats_r = at::empty({T}, aopt);
  }
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check(route_forward(dtype_code(x.scalar_type()), T, K, E, EL, r, clusters ? c.size(0) : 0,
                      top_k, scaling, yield_strength, static_cast<int>(reduce), x.data_ptr(),
                      h_in.data_ptr(), ld_h,
                      static_cast<const char*>(z_in.data_ptr()) +
                          (x_lora.has_value() ? 0 : R * x.element_size()),
                      ld_z, clusters ? c.data_ptr<float>() : nullptr,
                      clusters ? s.data_ptr<float>() : nullptr,
                      sh.defined() ? sh.data_ptr<float>() : nullptr,
                      sh.defined() ? sh.stride(0) : 0,
                      keep.defined() ? keep.data_ptr<uint8_t>() : nullptr,
                      keep.defined() ? keep.stride(0) : 0, h.data_ptr(), gates.data_ptr(),
                      idx.data_ptr<int64_t>(), dist.data_ptr(), assign.data_ptr<int64_t>(),
                      hg.data_ptr(), want_stats ? stats_j.data_ptr<int32_t>() : nullptr,
                      want_stats ? stats_r.data_ptr() : nullptr, stream),
        "route_forward");
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(hg, B.t());  // the gated expand accumulated into the same output
  at::Tensor stats;
  if (want_stats) {
    const int64_t C = c.size(0);
    if (T == 0) {
      stats = at::zeros({C, 2 * K + 3}, aopt);  // no token: all zeros
    } else {  // every entry is written: by the kernel, or by the sum of the group partials
      stats = at::empty({C, 2 * K + 3}, aopt);
      const int64_t groups = cluster_stats_groups(T, K);
      at::Tensor dst = groups > 1 ? at::empty({groups, C, 2 * K + 3}, aopt) : stats;
      check(cluster_stats(dtype_code(x.scalar_type()), T, K, C, groups, x.data_ptr(),
                          c.data_ptr<float>(), stats_j.data_ptr<int32_t>(), stats_r.data_ptr(),
                          dst.data_ptr(), groups > 1 ? dst.stride(0) : 0, stream),
            "cluster_stats");
      if (groups > 1) {  // a fixed-order sum over the groups (dim 0, spelled out: a bare 0
                         // could read as "no dims", a sum over everything)
        const int64_t group_dim[] = {0};
        at::sum_out(stats, dst, at::IntArrayRef(group_dim));
      }
    }
  } else {
    stats = at::empty({0, 2 * K + 3}, aopt);
  }
  return {y, gates, idx, dist, assign, h, stats};
}

std::vector<at::Tensor> cuda_backward(const at::Tensor& dy_, const c10::optional<at::Tensor>& dgates,
                                      const at::Tensor& x_, const c10::optional<at::Tensor>& x_lora,
                                      const at::Tensor& weight, const at::Tensor& lora_A_,
                                      const at::Tensor& lora_B_, const at::Tensor& router_,
                                      const at::Tensor& gates_, const at::Tensor& h_, int64_t EL,
                                      double scaling, int64_t /*mode*/) {
  TORCH_CHECK(x_.is_cuda(), "slim_kernels_C.cuda_backward: x must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto dy = dy_.to(x.scalar_type()).contiguous();
  auto A = lora_A_.contiguous();
  auto B = lora_B_.contiguous();
  auto Rw = router_.contiguous();
  const int64_t T = x.size(0), E = Rw.size(0), R = A.size(0);
  TORCH_CHECK(E <= kMaxExperts, "the cuda backend handles at most ", kMaxExperts, " experts");
  const int64_t r = R / EL;
  auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto gates = gates_.to(acc).contiguous();
  auto h = h_.to(acc).contiguous();
  at::Tensor dg;
  if (dgates.has_value() && dgates->numel() > 0) dg = dgates->to(acc).contiguous();
  auto dhg = at::mm(dy, B);
  auto dh = at::empty({T, R}, x.options());
  auto dz = at::empty({T, E}, x.options());
  auto hg = at::empty({T, R}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check(route_backward(dtype_code(x.scalar_type()), T, E, EL, r, scaling, dhg.data_ptr(),
                       h.data_ptr(), gates.data_ptr(), dg.defined() ? dg.data_ptr() : nullptr,
                       dh.data_ptr(), dz.data_ptr(), hg.data_ptr(), stream),
        "route_backward");
  auto xa = x_lora.has_value() ? x_lora->contiguous() : x;
  auto dB = at::mm(dy.t(), hg);
  auto dA = at::mm(dh.t(), xa);
  auto dR = at::mm(dz.t(), x);
  auto dx = at::mm(dy, weight);
  dx.addmm_(dz, Rw);
  at::Tensor dx_lora;
  if (x_lora.has_value()) {
    dx_lora = at::mm(dh, A);
  } else {
    dx.addmm_(dh, A);
    dx_lora = at::empty({0}, x.options());
  }
  return {dx, dx_lora, dA, dB, dR};
}

bool cuda_built() { return true; }

}  // namespace
}  // namespace slim_cuda

TORCH_LIBRARY_FRAGMENT(slim_kernels_C, m) {
  m.def(
      "cuda_forward(Tensor x, Tensor? x_lora, Tensor weight, Tensor? bias, Tensor lora_A, "
      "Tensor lora_B, Tensor router, Tensor? centers, Tensor? inv_std, Tensor? distance_shift, "
      "int num_lora_experts, int top_k, float scaling, float yield_strength, int reduce, "
      "int mode, Tensor? stats_keep, bool cluster_stats) -> Tensor[]");
  m.def(
      "cuda_backward(Tensor dy, Tensor? dgates, Tensor x, Tensor? x_lora, Tensor weight, "
      "Tensor lora_A, Tensor lora_B, Tensor router, Tensor gates, Tensor h, "
      "int num_lora_experts, float scaling, int mode) -> Tensor[]");
  m.def("cuda_built() -> bool", &slim_cuda::cuda_built);
}

TORCH_LIBRARY_IMPL(slim_kernels_C, CUDA, m) {
  m.impl("cuda_forward", &slim_cuda::cuda_forward);
  m.impl("cuda_backward", &slim_cuda::cuda_backward);
}
