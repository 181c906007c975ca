"""The ``target`` fixture of the op tests: every backend on every device (``_harness.TARGETS``),
skipped where it cannot run, saying why; the cpp backend fails instead under
SLIM_KERNELS_REQUIRE_EXT=1 (CI), where the extension must have been built."""
import pytest

from ._harness import TARGETS, require


@pytest.fixture(params=TARGETS, ids=lambda t: t.id)
def target(request):
    return require(request.param)
