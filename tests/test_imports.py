"""What importing the package costs: ``import slim_kernels`` imports no torch (PEP 562 lazy
names), ``import slim_kernels.ops`` no torch._dynamo (about 1 s), and torch.compile still
traces through the dispatch point that is marked without importing dynamo."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_import_slim_kernels_does_not_import_torch():
    out = _run("import sys, slim_kernels\n"
               "print('torch' in sys.modules, slim_kernels.__version__)")
    assert out.split()[0] == "False"


def test_public_names_resolve_lazily():
    import slim_kernels

    for name in slim_kernels.__all__:
        assert getattr(slim_kernels, name) is not None, name
    assert set(slim_kernels.__all__) <= set(dir(slim_kernels))
    with pytest.raises(AttributeError, match="no_such_name"):
        slim_kernels.no_such_name  # noqa: B018


def test_import_ops_does_not_import_dynamo():
    out = _run("import sys, slim_kernels.ops\nprint('torch._dynamo' in sys.modules)")
    assert out.strip() == "False"


def test_dispatch_mark_is_the_public_decorators():
    """dispatch marks ``_resolve`` itself when dynamo is not imported yet; the mark must be
    what ``torch.compiler.assume_constant_result`` sets (a torch upgrade could change it)."""
    from slim_kernels.ops import dispatch

    def f():
        return None

    before = dict(vars(f))
    torch.compiler.assume_constant_result(f)
    mark = {k: v for k, v in vars(f).items() if before.get(k, object()) is not v}
    assert mark, "the public decorator set no attribute: update dispatch._assume_constant_result"
    assert {k: getattr(dispatch._resolve, k, None) for k in mark} == mark


def test_compile_traces_dispatch_marked_before_dynamo_was_imported():
    """The order a user gets: slim_kernels.ops first (no dynamo), torch.compile later."""
    code = """
import sys, torch
import slim_kernels.ops as ops
assert "torch._dynamo" not in sys.modules
g = torch.Generator().manual_seed(0)
T, K, N, E_L, r, E, C = 9, 12, 10, 3, 2, 5, 2
W, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
centers, inv_std = torch.randn(C, K, generator=g), torch.rand(C, K, generator=g) + 0.5
leaves = [torch.randn(*s, generator=g) for s in ((T, K), (E_L * r, K), (N, E_L * r), (E, K))]

def f(x, A, B, R):
    y = ops.slim_linear_op(x, W, b, A, B, R, num_lora_experts=E_L, top_k=2, scaling=0.7,
                           yield_strength=1.0, centers=centers, inv_std=inv_std,
                           backend="torch")[0]
    return y.square().sum()

a = [t.clone().requires_grad_(True) for t in leaves]
e = [t.clone().requires_grad_(True) for t in leaves]
ops.dispatch.reset_cache()
torch.compile(f, fullgraph=True, backend="aot_eager")(*a).backward()
f(*e).backward()
assert all(torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-6) for p, q in zip(a, e))
print("ok")
"""
    assert _run(code).strip().endswith("ok")
