"""csrc/common/topk.h on the CPU: the top-k, softmax and cluster-argmin code that the CUDA route
kernel (csrc/cuda/slim_route.cu) and the CPU kernels share, built alone with the host C++
compiler (no torch, no CUDA) and held to the reference's rule (``docs/method.md`` §1.3, §1.5):
NaN last, ties to the lower index, NaN gates for a token with a non-finite logit, the first
non-finite squared distance wins the argmin. This is how the CUDA kernel's top-k is tested
where no GPU is; tests/test_csrc_nvcc.py checks that the kernel compiles with it."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from slim_kernels.reference import topk_softmax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which("g++") or shutil.which("c++")

DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "common/topk.h"

// stdin: T E k, then T*E logits (strtod syntax: nan, inf, -inf); stdout, per row: the k
// indices, the E gates and the argmin over the row (as squared distances), in %a
template <typename A>
int run() {
  long T, E, k;
  if (std::scanf("%ld %ld %ld", &T, &E, &k) != 3) return 2;
  std::vector<A> z(E), g(E);
  std::vector<int64_t> idx(k, -7);
  char buf[64];
  for (long t = 0; t < T; ++t) {
    for (long e = 0; e < E; ++e) {
      if (std::scanf("%63s", buf) != 1) return 3;
      z[e] = static_cast<A>(std::strtod(buf, nullptr));
    }
    slim_topk::topk_softmax_row<A>(z.data(), E, k, g.data(), idx.data());
    long best = 0;
    A best_sq = 0;
    for (long j = 0; j < E; ++j) {
      const A sq = slim_topk::argmin_key(z[j]);
      if (j == 0 || sq < best_sq) { best_sq = sq; best = j; }
    }
    for (long q = 0; q < k; ++q) std::printf("%lld ", static_cast<long long>(idx[q]));
    for (long e = 0; e < E; ++e) std::printf("%a ", static_cast<double>(g[e]));
    std::printf("%ld\n", best);
  }
  return 0;
}

int main(int argc, char** argv) { return argv[1][0] == 'd' ? run<double>() : run<float>(); }
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler (g++ / c++) on PATH")
    d = tmp_path_factory.mktemp("topk")
    src, exe = d / "topk_driver.cpp", d / "topk_driver"
    src.write_text(DRIVER)
    res = subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-I",
                          os.path.join(ROOT, "csrc"), str(src), "-o", str(exe)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return exe


def special_rows(T: int, E: int, seed: int) -> torch.Tensor:
    """Rows drawn from a small alphabet (ties everywhere) with NaN, +inf and -inf mixed in."""
    g = torch.Generator().manual_seed(seed)
    alphabet = torch.tensor([float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 0.5, 2.0],
                            dtype=torch.float64)
    rows = alphabet[torch.randint(len(alphabet), (T, E), generator=g)]
    rows[: T // 4] = torch.randn(T // 4, E, generator=g, dtype=torch.float64)  # all finite
    rows[T // 4: T // 2, :] = float("nan")  # all NaN
    return rows


def run_driver(exe, z: torch.Tensor, k: int, dtype: str):
    T, E = z.shape
    text = f"{T} {E} {k}\n" + "\n".join(" ".join(repr(float(v)) for v in row) for row in z)
    res = subprocess.run([str(exe), dtype], input=text, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    idx, gates, best = [], [], []
    for line in res.stdout.splitlines():
        f = line.split()
        idx.append([int(v) for v in f[:k]])
        gates.append([float.fromhex(v) for v in f[k:k + E]])
        best.append(int(f[-1]))
    return torch.tensor(idx), torch.tensor(gates, dtype=torch.float64), torch.tensor(best)


@pytest.mark.parametrize("dtype", ["double", "float"])
@pytest.mark.parametrize("E,k", [(1, 1), (5, 1), (5, 2), (7, 7), (10, 3)])
def test_header_matches_the_reference(driver, E, k, dtype):
    tdt = torch.float64 if dtype == "double" else torch.float32
    z = special_rows(400, E, seed=E * 10 + k).to(tdt)
    idx, gates, best = run_driver(driver, z, k, dtype)
    want_g, want_idx = topk_softmax(z, k)
    assert torch.equal(idx, want_idx)  # a valid permutation prefix, NaN last, ties by index
    bad = ~torch.isfinite(z).all(1)
    assert gates[bad].isnan().all() and not gates[~bad].isnan().any()
    tol = 1e-15 if dtype == "double" else 1e-6
    torch.testing.assert_close(gates[~bad], want_g[~bad].double(), rtol=tol, atol=tol)
    # argmin with a non-finite value first: the rule of the reference's cluster assignment
    key = torch.where(torch.isfinite(z), z, float("-inf"))
    assert torch.equal(best, key.argmin(1))
