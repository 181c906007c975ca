"""What only the triton backend has: its limits (E_L·r <= 1024, E <= 256) and the messages
saying why it cannot run a call. Its numerics are in the conformance suite."""
import pytest
import torch

from slim_kernels.ops.backends.triton import launch as tb
from slim_kernels.ops.dispatch import resolve_backend

from ._harness import INTERPRET


def test_unsupported_inputs_raise_clearly():
    if tb._IMPORT_ERROR is not None:
        assert "triton does not import" in tb.unavailable_reason()
        pytest.skip(f"triton does not import: {tb._IMPORT_ERROR}")
    x = torch.zeros(2, 4)
    if INTERPRET:
        assert tb.unsupported_reason(x) is None
        assert "dtype" in tb.unsupported_reason(x.to(torch.int32))
    else:
        assert "TRITON_INTERPRET" in tb.unsupported_reason(x)
    assert tb.unavailable_reason() is None  # tests/conftest.py sets the interpreter without CUDA
    assert "limit of 1024" in tb.unsupported_reason(x, lora_cols=1025, num_experts=10)
    assert "limit of 256" in tb.unsupported_reason(x, lora_cols=64, num_experts=257)
    with pytest.raises(RuntimeError, match="limit of 1024"):  # explicit: a clear error
        resolve_backend("triton", x, 1025, 10)
    ER = 1025
    with pytest.raises(ValueError, match="exceeds 1024"):
        tb.forward(x, None, torch.zeros(3, 4), None, torch.zeros(ER, 4), torch.zeros(3, ER),
                   torch.zeros(2, 4), None, None, 1, 1, 1.0, 0.0, "rms")
