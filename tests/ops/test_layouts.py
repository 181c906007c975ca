"""Every tensor argument as a non-contiguous view, in turn, on every backend.

``slim_linear_op`` makes x, x_lora, lora_A, lora_B, router and dy contiguous before the
backend, but hands weight, bias, centers, inv_std, distance_shift and the gates' upstream
gradient to it as given (``slim_kernels/ops/backends/__init__.py``). So each layout runs twice: through the
public op (every argument), and straight into the backend module's ``forward``/``backward``
(the passed-through ones), so that a backend that ignores strides fails here even if the op
boundary changes. The last test plants such a backend and checks the harness catches it.
"""
import pytest
import torch

from slim_kernels.ops.backends import torch as torch_backend

from ._harness import (LAYOUTS, PASSED_THROUGH, Target, apply_layout, conform, dtypes,
                       layout_case, make_inputs, misread, run_backend, run_op,
                       skip_unsupported)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _id(p):
    return f"{p[0]}-{p[1]}"


@dtypes()
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_strided_argument_through_the_op(target, layout, dtype):
    skip_unsupported(target, dtype)
    arg, kind = layout
    case = layout_case(arg)
    inp = apply_layout(make_inputs(case, dtype, target.device), arg, kind)
    got = run_op(target, case, inp)
    conform(got, case, inp, f"{target.id} {arg} {kind} {dtype}")


@dtypes()
@pytest.mark.parametrize("layout", PASSED_THROUGH, ids=_id)
def test_strided_argument_into_the_backend(target, layout, dtype):
    skip_unsupported(target, dtype)
    arg, kind = layout
    case = layout_case(arg)
    inp = apply_layout(make_inputs(case, dtype, target.device), arg, kind)
    got = run_backend(target, case, inp)
    conform(got, case, inp, f"{target.id} {arg} {kind} {dtype} (backend direct)")


@pytest.mark.parametrize("direct", [False, True], ids=["op", "backend"])
@pytest.mark.parametrize("layout", [p for p in PASSED_THROUGH if p[1] != "expanded"], ids=_id)
def test_harness_catches_a_backend_that_ignores_strides(monkeypatch, layout, direct):
    """A torch backend that reads one argument as if it were contiguous (the same storage,
    row-major strides) must fail the comparison: the layouts above can fail. (A stride-0
    view cannot be misread so: its storage holds one row.)"""
    arg, kind = layout
    real_fwd, real_bwd = torch_backend.forward, torch_backend.backward
    fwd_pos = {"weight": 2, "bias": 3, "centers": 7, "inv_std": 8, "distance_shift": 14,
               "stats_keep": 16}
    bwd_pos = {"dgates": 1, "weight": 4}

    def planted(real, pos):
        def call(*args):
            args = list(args)
            if pos is not None:
                args[pos] = misread(args[pos])
            return real(*args)
        return call

    monkeypatch.setattr(torch_backend, "forward", planted(real_fwd, fwd_pos.get(arg)))
    monkeypatch.setattr(torch_backend, "backward", planted(real_bwd, bwd_pos.get(arg)))
    t = Target("torch", "cpu")
    case = layout_case(arg)
    inp = apply_layout(make_inputs(case, torch.float32), arg, kind)
    got = (run_backend if direct else run_op)(t, case, inp)
    with pytest.raises(AssertionError):
        conform(got, case, inp)
    # and the same call on contiguous inputs passes (the misread is what fails)
    plain = make_inputs(case, torch.float32)
    conform((run_backend if direct else run_op)(t, case, plain), case, plain)
