"""Test setup. TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is
set here, before slim_kernels is imported, whenever no CUDA device is present.

ONEDNN_MAX_CPU_ISA: on CPUs with AMX, PyTorch's bf16 matmul (oneDNN's AMX kernels) can carry
a NaN from one row of its input into the neighbouring row of its output, for some shapes
(docs/backends.md, "bf16 on CPUs with AMX"). The conformance suite holds every backend to
the non-finite contract (a bad token leaves the others alone), which no bf16 matmul on such
a CPU keeps, so the suite runs with oneDNN capped below AMX, on every machine alike;
tests/ops/test_nonfinite.py::test_bf16_matmul_keeps_a_nan_in_its_row_without_the_cap shows
the platform's behaviour without the cap. Set before torch runs its first matmul."""
import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-benchmarks", action="store_true", default=False,
                     help="run the pytest-benchmark timing entries (off by default)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-benchmarks"):
        return
    skip = pytest.mark.skip(reason="timing entry: run with --run-benchmarks")
    for item in items:
        if "benchmark" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waits
    (halves the CPU time of the HF tests). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
