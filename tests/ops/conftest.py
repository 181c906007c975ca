"""The ``target`` fixture of the op tests: every backend on every device (``_harness.TARGETS``),
skipped where it cannot run, saying why; the cpp backend fails instead under
SLIM_KERNELS_REQUIRE_EXT=1 (CI), where the extension must have been built. A triton target's
design is forced for the test (``launch.DESIGN``; None: the dispatch's own choice)."""
import pytest

from ._harness import TARGETS, require


@pytest.fixture(params=TARGETS, ids=lambda t: t.id)
def target(request, monkeypatch):
    t = require(request.param)
    if t.backend == "triton":
        from slim_kernels.ops.backends.triton import launch
        monkeypatch.setattr(launch, "DESIGN", t.design)
    return t
