"""Dispatch (``slim_kernels/ops/dispatch.py``): which backend runs a call, the fallback to
``torch`` under ``auto``, and the dtypes every backend declares it runs (the conformance
suite skips exactly the others, so this is what keeps those skips honest)."""
import warnings

import pytest
import torch

from slim_kernels.ops import dispatch
from slim_kernels.ops.dispatch import available_backends, resolve_backend

from . import _harness
from ._harness import ALL_DTYPES, SUPPORTED, Target, require


@pytest.fixture
def fresh_dispatch():
    dispatch.reset_cache()
    yield
    dispatch.reset_cache()


def test_declared_support_matrix(target):
    mod = target.module()
    for dt in ALL_DTYPES:
        why = mod.unsupported_reason(torch.empty(2, 3, dtype=dt, device=target.device))
        assert (why is None) == (dt in SUPPORTED[target]), (target.id, dt, why)
    if target.backend != "torch":  # the torch backend runs anything torch runs
        assert mod.unsupported_reason(torch.empty(2, 3, dtype=torch.int32,
                                                  device=target.device)) is not None


def test_auto_picks_cpp_for_cpu():
    require(Target("cpp", "cpu"))
    cpp = Target("cpp", "cpu").module()
    x = torch.randn(3, 4)
    assert resolve_backend("auto", x) == "cpp"
    assert resolve_backend("cpp", x) == "cpp"
    assert "cpp" in available_backends() and "torch" in available_backends()
    assert cpp.unsupported_reason(torch.empty(2, 2, device="meta")) is not None
    assert cpp.unsupported_reason(torch.empty(2, 2, dtype=torch.int32)) is not None
    with pytest.raises(RuntimeError, match="cannot run this input"):
        resolve_backend("cpp", torch.empty(2, 2, device="meta"))


def test_auto_falls_back_to_torch_warning_once(fresh_dispatch, monkeypatch):
    monkeypatch.setitem(dispatch._cache, "cpp", "not built (planted by the test)")
    x = torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match="using the 'torch' backend"):
        assert resolve_backend("auto", x) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", x) == "torch"  # warned once already
    assert "cpp" not in available_backends()
    with pytest.raises(RuntimeError, match="cannot run: not built.*To use it: build the C"):
        resolve_backend("cpp", x)


def test_missing_cpp_extension_fails_under_require_ext(monkeypatch):
    """CI sets SLIM_KERNELS_REQUIRE_EXT=1: a missing extension must fail the cpp tests, not
    skip them; other targets that cannot run still skip."""
    monkeypatch.setattr(_harness, "unrunnable", lambda t: "not built (planted by the test)")
    monkeypatch.setattr(_harness, "REQUIRE_EXT", True)
    with pytest.raises(pytest.fail.Exception, match="SLIM_KERNELS_REQUIRE_EXT=1"):
        require(Target("cpp", "cpu"))
    with pytest.raises(pytest.skip.Exception, match="not built"):
        require(Target("triton", "cpu"))
    monkeypatch.setattr(_harness, "REQUIRE_EXT", False)
    with pytest.raises(pytest.skip.Exception, match="not built"):
        require(Target("cpp", "cpu"))
