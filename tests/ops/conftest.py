"""The ``target`` fixture of the op tests: every backend on every device (``_harness.TARGETS``).
A target that cannot run here skips, saying why, except the cpp backend under
SLIM_KERNELS_REQUIRE_EXT=1 (CI), which fails: there the extension must have been built."""
import pytest

from ._harness import REQUIRE_EXT, TARGETS, unrunnable


@pytest.fixture(params=TARGETS, ids=lambda t: t.id)
def target(request):
    t = request.param
    why = unrunnable(t)
    if why is not None:
        if t.backend == "cpp" and REQUIRE_EXT:
            pytest.fail(f"cpp backend unavailable: {why} (SLIM_KERNELS_REQUIRE_EXT=1)")
        pytest.skip(f"{t.id}: {why}")
    return t

