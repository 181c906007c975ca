"""csrc/common/cluster_stats.h on the CPU: the per-block work of the CUDA cluster-statistics
kernel (csrc/cuda/slim_route.cu, backend ``cuda``), built alone with the host C++ compiler (no
torch, no CUDA) and run block by block and thread by thread as the kernel runs it (phase 0 for
every thread, then phase 1, then phase 2: the kernel's __syncthreads() between them), in 1-3
token groups whose partials are then summed in order, as the host binding does. Held to
:func:`slim_kernels.reference.reference_cluster_stats`, and to its non-finite rule: a NaN or
inf centre entry or r reaches only its own cluster's row. This is how the CUDA kernel's
indexing (channels past K, the [1, r, r²] block, the row split of the tokens, the group
bounds) is tested where no GPU is; tests/test_csrc_nvcc.py checks that the kernel compiles."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from slim_kernels.reference import reference_cluster_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which("g++") or shutil.which("c++")

DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "common/cluster_stats.h"

// argv: d|f T K C groups rows dir. Reads dir/{x,centers,sj,r}.bin (x and r in the acc dtype,
// centers fp32, sj int32), writes dir/out.bin: the groups' (C, 2K + 3) partials.
template <typename A>
int run(long T, long K, long C, long groups, int rows, const char* dir) {
  auto path = [&](const char* f) { static char b[4096]; std::snprintf(b, sizeof b, "%s/%s", dir, f); return b; };
  auto load = [&](const char* f, void* p, size_t n) {
    FILE* fp = std::fopen(path(f), "rb");
    if (!fp || std::fread(p, 1, n, fp) != n) return false;
    std::fclose(fp);
    return true;
  };
  std::vector<A> x(T * K), r(T);
  std::vector<float> c(C * K);
  std::vector<int> sj(T);
  if (!load("x.bin", x.data(), x.size() * sizeof(A)) || !load("r.bin", r.data(), T * sizeof(A)) ||
      !load("centers.bin", c.data(), c.size() * sizeof(float)) ||
      !load("sj.bin", sj.data(), T * sizeof(int)))
    return 2;
  const long L = slim_stats::row_len(K);
  std::vector<A> out(groups * C * L, A(-777));  // every entry must be written
  const long group_len = (T + groups - 1) / groups;
  const int nthreads = rows * slim_stats::kLanes;
  const long n = slim_stats::slots(rows, C);
  std::vector<A> s0(n), s1(n);
  auto to_acc = [](A v) { return v; };
  for (long g = 0; g < groups; ++g) {
    const long t_lo = g * group_len, t_hi = t_lo + group_len < T ? t_lo + group_len : T;
    for (long cb = 0; cb < slim_stats::col_blocks(K); ++cb) {
      for (int tid = 0; tid < nthreads; ++tid) slim_stats::zero(s0.data(), s1.data(), n, tid, nthreads);
      for (int tid = 0; tid < nthreads; ++tid)
        slim_stats::accumulate<A>(cb, tid / slim_stats::kLanes, tid % slim_stats::kLanes, rows,
                                  t_lo, t_hi, K, C, x.data(), K, c.data(), sj.data(), r.data(),
                                  s0.data(), s1.data(), to_acc);
      for (int tid = 0; tid < nthreads; ++tid)
        slim_stats::reduce(cb, rows, K, C, s0.data(), s1.data(), out.data() + g * C * L, L,
                           tid, nthreads);
    }
  }
  FILE* fp = std::fopen(path("out.bin"), "wb");
  if (!fp || std::fwrite(out.data(), sizeof(A), out.size(), fp) != out.size()) return 3;
  std::fclose(fp);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 8) return 1;
  const long T = std::atol(argv[2]), K = std::atol(argv[3]), C = std::atol(argv[4]);
  const long groups = std::atol(argv[5]);
  const int rows = std::atoi(argv[6]);
  return argv[1][0] == 'd' ? run<double>(T, K, C, groups, rows, argv[7])
                           : run<float>(T, K, C, groups, rows, argv[7]);
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler (g++ / c++) on PATH")
    d = tmp_path_factory.mktemp("stats")
    src, exe = d / "stats_driver.cpp", d / "stats_driver"
    src.write_text(DRIVER)
    res = subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-I",
                          os.path.join(ROOT, "csrc"), str(src), "-o", str(exe)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return exe


def run_driver(exe, tmp_path, x, centers, sj, r, groups, rows):
    """The statistics as the CUDA kernel computes them (the group partials summed in order)."""
    T, K = x.shape
    C = centers.shape[0]
    for name, t in (("x", x), ("centers", centers), ("sj", sj), ("r", r)):
        (tmp_path / f"{name}.bin").write_bytes(t.contiguous().numpy().tobytes())
    kind = "d" if x.dtype == torch.float64 else "f"
    res = subprocess.run([str(exe), kind, str(T), str(K), str(C), str(groups), str(rows),
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, (res.returncode, res.stderr)
    raw = np.frombuffer((tmp_path / "out.bin").read_bytes(),
                        dtype=np.float64 if kind == "d" else np.float32)
    parts = torch.from_numpy(raw.copy()).view(groups, C, 2 * K + 3)
    assert not bool((parts == -777).any()), "an entry of a partial was never written"
    return parts.sum(0)


def make(dtype, T=83, K=45, C=5, seed=0, reduce="rms"):
    """x, centres, inv_std, the tokens' clusters (about a fifth not kept: -1) and their r."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g, dtype=torch.float64).to(dtype)
    centers = (torch.randn(C, K, generator=g) * 0.5).float()
    inv_std = (torch.rand(C, K, generator=g) + 0.5).float()
    assign = torch.randint(0, C, (T,), generator=g)
    assign[:C] = torch.arange(C)  # every cluster has tokens
    keep = torch.rand(T, generator=g) >= 0.2
    keep[:C] = True
    sj = torch.where(keep, assign, -1).to(torch.int32)
    u = (x.to(dtype) - centers.to(dtype)[assign]).abs() * inv_std.to(dtype)[assign]
    r = {"max": lambda: u.amax(1), "mean": lambda: u.mean(1),
         "rms": lambda: u.square().mean(1).sqrt()}[reduce]()
    return x, centers, inv_std, assign, keep, sj, r


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("rows", [8, 3, 1])
@pytest.mark.parametrize("K", [45, 64, 7])
def test_header_matches_the_reference(driver, tmp_path, dtype, groups, rows, K):
    """K = 45 (a partial last block), 64 (none), 7 (one block, 25 lanes idle); 8, 3 or 1
    thread rows; T = 83 in 1-3 groups (the last one shorter)."""
    x, centers, inv_std, assign, keep, sj, r = make(dtype, K=K, seed=K + rows)
    got = run_driver(driver, tmp_path, x, centers, sj, r, groups, rows)
    want = reference_cluster_stats(x, centers, inv_std, assign, "rms", keep)
    assert got.dtype == want.dtype
    assert torch.equal(got[:, 0], want[:, 0])  # the counts, exactly
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    e = (got.double() - want.double()).norm() / want.double().norm()
    assert e <= tol, e


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("groups", [1, 3])
def test_a_bad_centre_or_r_poisons_its_own_row_only(driver, tmp_path, value, groups):
    """A non-finite centre entry of cluster 1 and a non-finite r of a token of cluster 3:
    rows 1 and 3 non-finite in exactly those columns, every other entry bit-identical to the
    clean call."""
    x, centers, inv_std, assign, keep, sj, r = make(torch.float32, seed=7)
    K = x.shape[1]
    clean = run_driver(driver, tmp_path, x, centers, sj, r, groups, 8)
    assert bool(torch.isfinite(clean).all())
    bad_c, bad_r = centers.clone(), r.clone()
    bad_c[1, 5] = value
    bad_r[int((sj == 3).nonzero()[0])] = value
    got = run_driver(driver, tmp_path, x, bad_c, sj, bad_r, groups, 8)
    hit = torch.zeros_like(got, dtype=torch.bool)
    hit[1, [1 + 5, 1 + K + 5]] = True
    hit[3, 2 * K + 2] = True  # Σr² is +inf or NaN
    hit[3, 2 * K + 1] = True  # Σr
    assert bool((~torch.isfinite(got[hit])).all())
    assert torch.equal(got[~hit], clean[~hit])
