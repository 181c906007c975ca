"""Op boundary fix: the real slim_fwd returned non-contiguous top-k indices (a column slice
of an argsort) while its fake implementation promises contiguous outputs; inductor's stride
check then failed under torch.compile. opcheck compares the fake and real outputs."""
import torch

import slim_kernels.ops  # noqa: F401  (registers the ops; `import slim_kernels` alone is lazy)


def test_slim_fwd_opcheck_fake_matches_real():
    torch.manual_seed(0)
    T, K, N, E_L, r, E = 7, 6, 5, 2, 3, 4
    x = torch.randn(T, K)
    args = (x, None, torch.randn(N, K), torch.randn(N), torch.randn(E_L * r, K),
            torch.randn(N, E_L * r), torch.randn(E, K), torch.randn(3, K), torch.rand(3, K) + 0.5,
            E_L, 2, 1.5, 1.0, "rms", "torch")
    out = torch.ops.slim_kernels.slim_fwd(*args)
    assert all(t.is_contiguous() for t in out)
    torch.library.opcheck(torch.ops.slim_kernels.slim_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
