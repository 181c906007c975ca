"""Child process of the kill-during-save test (tests/test_save_format.py): builds the adapter
of ``seed`` (about 34 MB) and saves it into ``folder``.

``python _save_kill_worker.py FOLDER SEED PHASE DELAY`` SIGKILLs itself DELAY seconds after the
start of PHASE of the save: 0 its start (gathering, checksums, serialising come first and
write nothing), 1 the writing of the new folder beside the old one, 2 the exchange of the two
and the clean-up after it.
The kill comes from a thread of the process, so its timing does not depend on how fast a
parent process is scheduled. Without PHASE it saves and prints the seconds at which phases 1
and 2 began and the save ended."""
import os
import signal
import sys
import threading
import time

import torch
from torch import nn

import slim_kernels as sk

CONFIG = dict(num_lora_experts=8, num_identity_experts=2, rank=64, num_clusters=4,
              backend="torch", target_modules=("up_proj",))
K, N, LAYERS = 64, 8192, 2  # lora_B (8, 8192, 64) fp32 = 16.8 MB per layer


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        # the base weights are not part of an adapter: left uninitialised
        self.blocks = nn.ModuleList(nn.ModuleDict({"up_proj": nn.utils.skip_init(nn.Linear, K, N)})
                                    for _ in range(LAYERS))


def adapter(seed: int) -> nn.Module:
    """A base model with SLIM applied and every SLIM tensor drawn from ``seed``."""
    model = sk.apply_slim(Base(), sk.SlimConfig(**CONFIG), verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sk.slim_modules(model):
            for t in (m.lora_A, m.lora_B, m.router, m.clusters.cluster_centers):
                t.copy_(torch.randn(t.shape, generator=g))
            m.clusters.cluster_vars.copy_(torch.rand(m.clusters.cluster_vars.shape, generator=g) + 0.1)
            m.clusters.cluster_initialized.fill_(True)
    return model


def _kill_in(delay: float) -> None:
    def kill():
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=kill, daemon=True).start()


if __name__ == "__main__":
    from slim_kernels.integrations import adapter_format

    folder, seed = sys.argv[1], int(sys.argv[2])
    phase, delay = (int(sys.argv[3]), float(sys.argv[4])) if len(sys.argv) > 4 else (-1, 0.0)
    model = adapter(seed)
    marks = []

    def mark(real, once):
        """``real``, marking the start of a phase at its first call (every call: not ``once``)."""
        def f(*a):
            if not (once and f.seen):
                marks.append(time.perf_counter())
                if len(marks) == phase:
                    _kill_in(delay)
            f.seen = True
            return real(*a)
        f.seen = False
        return f

    # the save's phases: writing the new folder's files (1), the exchange and the clean-up (2)
    adapter_format._write_file = mark(adapter_format._write_file, once=True)
    adapter_format.exchange = mark(adapter_format.exchange, once=False)
    t0 = time.perf_counter()
    if phase == 0:
        _kill_in(delay)
    sk.save_slim(model, folder)
    t1 = time.perf_counter()
    print("saved", *(f"{t - t0:.4f}" for t in marks + [t1]), flush=True)
