"""Measuring: the one timing harness of the project, memory, quantiles, the FLOP floor, and
:func:`run_bench` (every provider on every case in every mode, as CSV rows).

Metrics (the ``metric`` CSV column):

* ``time_ms``: wall time of one call, median / p20 / p80 over repetitions that go
  round-robin over the providers (the start provider rotates each repetition), so drift of
  a shared machine hits every provider alike. CUDA: the GPU time between two CUDA events
  recorded around the call, with the L2 cache flushed before it (as
  ``triton.testing.do_bench`` does) and the GPU kept busy by a spin kernel while the host
  queues the call, so that the host's launch time is not counted as GPU time.
* ``host_ms`` (CUDA only): the host time of the same call, from its start to the return of
  the Python call (its kernels queued, not finished): what each call costs the CPU. A call
  whose host_ms exceeds its time_ms is launch-bound.
* ``cpu_ms`` (CPU only): process CPU time of the same calls (all threads), quantiles as
  above. On a shared machine it leaves out the time the process waited for a core.
* ``peak_MB``: peak of the bytes allocated *during* the call above what was allocated at its
  start (outputs, saved activations, temporaries). CUDA: ``torch.cuda.max_memory_allocated``.
  CPU: the allocation / free events of ``torch.profiler(profile_memory=True)`` summed in time
  order (CPU allocator only; one untimed call; the untimed forward before a timed backward
  is profiled too, so the activations backward frees are counted as freed).
* ``saved_MB`` (forward mode only): bytes of the tensors autograd keeps for backward, not
  counting the inputs and parameters themselves (``saved_tensors_hooks``; distinct storages).
* ``max_rel_err`` (with ``check=True``; mode ``forward``): max |y - y_ref| / max |y_ref| of
  one forward of the provider against the fp64 truth (:func:`~.providers.reference_output`).

The FLOP floor (``docs/method.md`` §6) is reported beside the measured ratios: per token the
base forward is 2NK and SLIM adds 2(E_L·r+E)K + 2E_L·r·N; the base backward is the dx GEMM
2NK and SLIM adds dhg = dy B_all (2E_L·r·N), dB_all (2E_L·r·N), [dA; dR] (2(E_L·r+E)K) and
dx += [dh|dz][A;R] (2(E_L·r+E)K).
"""
from __future__ import annotations

import gc
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..provenance import provenance_string
from .cases import MODES, Case, Inputs, make_inputs
from .providers import Runner, Skip, providers_for, reference_output

__all__ = ["Timings", "BenchResult", "dtype_name", "flop_floor", "peak_bytes", "quantiles",
           "run_bench", "saved_bytes", "step", "sync_fn", "time_back_to_back", "time_cuda_graph",
           "time_interleaved"]

logger = logging.getLogger("slim_kernels")

Call = Callable[[], object]


# --------------------------------------------------------------------------------------
# The timing harness
# --------------------------------------------------------------------------------------
def sync_fn(device) -> Callable[[], None]:
    """What makes a call's end observable on ``device``: a CUDA synchronize, or nothing."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def step(runner: Runner, mode: str, dy: Tensor) -> Tuple[Call, Call]:
    """(prep, timed) closures for one call of ``runner`` in ``mode``; prep is untimed."""
    state: Dict[str, Optional[Tensor]] = {"y": None}

    def clear():
        for t in runner.leaves:
            t.grad = None

    if mode == "forward":
        def prep():
            clear()

        def timed():
            return runner.fwd()
    elif mode == "backward":
        def prep():
            clear()
            state["y"] = runner.fwd()

        def timed():
            y = state["y"]
            state["y"] = None
            y.backward(dy)
    elif mode == "forward+backward":
        def prep():
            clear()

        def timed():
            runner.fwd().backward(dy)
    else:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    return prep, timed


@dataclass
class Timings:
    """Per provider, the times (ms) of every timed call, and the providers that failed."""

    wall_ms: Dict[str, List[float]] = field(default_factory=dict)
    cpu_ms: Dict[str, List[float]] = field(default_factory=dict)
    host_ms: Dict[str, List[float]] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)


class _CudaClock:
    """GPU time of a call: CUDA events recorded before and after it on the current stream,
    the L2 cache flushed (a 256 MB write) before the first event, as do_bench does, then a
    spin kernel (``torch.cuda._sleep``) of ``lead_ms`` queued before the first event: the GPU
    is still spinning while the host queues the call, so the events measure the call's GPU
    work and not the host's launches (without it, a call whose launches take longer than the
    flush is timed at its host speed)."""

    CYCLES_PER_MS = 2.0e6  # ~2 GHz SM clock (H100/H200 boost: 1.98 GHz); a lead, not a timer

    def __init__(self):
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def start(self, lead_ms: float = 0.0):
        self.flush.zero_()
        if lead_ms > 0:
            torch.cuda._sleep(int(lead_ms * self.CYCLES_PER_MS))
        self.t0 = torch.cuda.Event(enable_timing=True)
        self.t1 = torch.cuda.Event(enable_timing=True)
        self.t0.record()

    def stop(self) -> float:
        self.t1.record()
        self.t1.synchronize()
        return self.t0.elapsed_time(self.t1)


def time_interleaved(steps: Mapping[str, Tuple[Call, Call]], *, reps: int, warmup: int,
                     sync: Callable[[], None] = lambda: None,
                     tick: Callable[[int, str], None] = lambda n, name: None,
                     cuda_events: bool = False) -> Timings:
    """Time ``steps`` (name -> (prep, timed)) side by side.

    Each provider first runs ``warmup`` untimed calls (compiles, autotunes, allocates); one
    that raises is dropped and its error kept in ``Timings.failed``. Then ``reps``
    repetitions: each runs every provider once, the start provider rotating, so the drift of
    a shared machine hits every provider alike. A call is timed from after its untimed
    ``prep`` (and a ``sync``) to after the ``sync`` that follows it, in wall time
    (``perf_counter``) and process CPU time (all threads); with ``cuda_events``, in GPU time
    between CUDA events (:class:`_CudaClock`). ``tick(calls, name)`` is told of every
    ``calls`` done (for a progress bar). ``host_ms``: the time until ``timed`` returns (its
    work queued, on CUDA); the spin lead before a CUDA-timed call is 1.5 x the largest host
    time seen in warmup (0.2 to 20 ms)."""
    out = Timings()
    clock = _CudaClock() if cuda_events else None
    names = []
    lead: Dict[str, float] = {}
    for n, (prep, timed) in steps.items():
        try:
            lead[n] = 0.0
            for _ in range(warmup):
                prep()
                sync()
                h0 = time.perf_counter()
                res = timed()
                lead[n] = max(lead[n], (time.perf_counter() - h0) * 1e3)
                del res
                sync()
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            out.failed[n] = f"{type(e).__name__}: {first}"
            tick(warmup + reps, n)
            continue
        tick(warmup, n)
        names.append(n)
    for n in names:
        out.wall_ms[n], out.cpu_ms[n], out.host_ms[n] = [], [], []
    for rep in range(reps):
        k = rep % len(names) if names else 0
        for n in names[k:] + names[:k]:
            prep, timed = steps[n]
            prep()
            sync()
            if clock is not None:
                clock.start(min(20.0, max(0.2, 1.5 * lead[n])))
            c0 = time.process_time()
            t0 = time.perf_counter()
            res = timed()
            th = time.perf_counter()
            gpu_ms = clock.stop() if clock is not None else None
            sync()
            t1 = time.perf_counter()
            c1 = time.process_time()
            del res
            out.wall_ms[n].append(gpu_ms if gpu_ms is not None else (t1 - t0) * 1e3)
            out.cpu_ms[n].append((c1 - c0) * 1e3)
            out.host_ms[n].append((th - t0) * 1e3)
            tick(1, n)
    return out


def time_back_to_back(prep: Call, timed: Call, reps: int, sync: Callable[[], None] = lambda: None,
                      cuda_events: bool = False) -> float:
    """ms per call of ``reps`` calls queued back to back (``prep`` before each, no sync in
    between, warm caches): on a GPU what a loop of calls costs end to end; when the host
    cannot queue the calls as fast as the GPU runs them, this is the host's time per call
    (launch-bound), not the GPU's. CUDA events around the loop on a GPU, wall time else."""
    sync()
    if cuda_events:
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
    w0 = time.perf_counter()
    for _ in range(reps):
        prep()
        res = timed()
        del res
    if cuda_events:
        t1.record()
    sync()
    if cuda_events:
        return t0.elapsed_time(t1) / reps
    return (time.perf_counter() - w0) * 1e3 / reps


def time_cuda_graph(prep: Call, timed: Call, reps: int) -> float:
    """ms per replay of one call captured in a CUDA graph (``prep`` runs before the capture,
    on the capture stream): the GPU time without any launch cost. The call must have run
    before (compiled, autotuned: the triton backend uses its configuration file under
    capture) and must not synchronise with the host."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        prep()
        timed()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    prep()
    with torch.cuda.graph(g):
        keep = timed()
    g.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        g.replay()
    t1.record()
    torch.cuda.synchronize()
    del keep, g
    return t0.elapsed_time(t1) / reps


def quantiles(v: Sequence[float]) -> Tuple[float, float, float]:
    """(median, p20, p80) of ``v`` (deciles, inclusive method)."""
    s = sorted(v)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7]


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------
class _quiet_fd2:
    """Send the C-level stderr (fd 2) to /dev/null inside the block."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            self._null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self._null, 2)
        except Exception:  # pragma: no cover (no fd 2, e.g. some notebooks)
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            os.close(self._null)
        return False


def _cpu_peak_bytes(prep: Call, timed: Call) -> float:
    """Peak of (allocated - allocated when ``timed`` starts) during ``timed``, from the
    profiler's allocation / free events (CPU allocator). ``prep`` runs inside the profiler
    too, so that blocks it allocates (the graph of a forward before a timed backward) are
    seen when ``timed`` frees them; frees of blocks older than the profiler are not seen."""
    from torch.profiler import ProfilerActivity, profile

    keep = []
    with _quiet_fd2():  # kineto prints profiler_start/stop lines on fd 2
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            prep()
            mark = time.time_ns()  # the profiler's event clock is the epoch clock
            keep.append(timed())
    # CPU-only profiling: every [memory] event is a CPU allocation (+) or free (-)
    evs = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]")
    level = sum(nb for t, nb in evs if t < mark)
    cur = peak = level
    for t, nb in evs:
        if t < mark:
            continue
        cur += nb
        peak = max(peak, cur)
    del keep
    return float(peak - level)


def peak_bytes(device, prep: Call, timed: Call) -> float:
    """Peak bytes allocated during one untimed call of ``timed`` above those at its start."""
    if torch.device(device).type == "cuda":
        prep()
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = timed()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        del out
        return float(peak)
    return _cpu_peak_bytes(prep, timed)


def saved_bytes(runner: Runner, inp: Inputs) -> float:
    """Bytes of distinct storages autograd saves in a forward, inputs and parameters aside."""
    skip = {t.untyped_storage().data_ptr() for t in
            [inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.router, inp.dy]
            + [t for t in (inp.bias, inp.centers, inp.inv_std) if t is not None]
            + runner.exclude}
    seen: Dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            p = s.data_ptr()
            if p not in skip:
                seen[p] = s.nbytes()
        except Exception:
            pass
        return t

    for t in runner.leaves:
        t.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = runner.fwd()
    del y
    return float(sum(seen.values()))


# --------------------------------------------------------------------------------------
# FLOP floor (docs/method.md §6)
# --------------------------------------------------------------------------------------
def flop_floor(case: Case, mode: str) -> float:
    """SLIM FLOPs / base FLOPs for ``mode`` (the ratio a perfect fused kernel of the stacked
    cut reaches when compute-bound). Per token: forward base 2NK, SLIM extra
    2(E_L·r+E)K + 2E_L·r·N; backward base 2NK (dx only), SLIM extra 4E_L·r·N + 4(E_L·r+E)K."""
    K, N, R_, E = case.K, case.N, case.num_lora_experts * case.rank, case.E
    base_f = 2.0 * N * K
    extra_f = 2.0 * (R_ + E) * K + 2.0 * R_ * N
    base_b = 2.0 * N * K
    extra_b = 4.0 * R_ * N + 4.0 * (R_ + E) * K
    if mode == "forward":
        return 1.0 + extra_f / base_f
    if mode == "backward":
        return 1.0 + extra_b / base_b
    return 1.0 + (extra_f + extra_b) / (base_f + base_b)


# --------------------------------------------------------------------------------------
# A whole benchmark
# --------------------------------------------------------------------------------------
def dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _max_rel_err(runner: Runner, inp: Inputs) -> float:
    with torch.no_grad():
        y = runner.fwd().double()
    ref = reference_output(inp, runner.name)
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@dataclass
class BenchResult:
    rows: List[Dict[str, str]]
    skipped: Dict[str, str]
    cases: List[Tuple[str, Case]]

    @property
    def measured(self) -> List[str]:
        """Providers with a time, base aside."""
        return sorted({r["provider"] for r in self.rows
                       if r["metric"] == "time_ms" and r["provider"] != "base"})


def run_bench(
    cases: Sequence[Case], sweep: str = "T", *, device: str = "cpu", dtype=None,
    modes: Sequence[str] = MODES, providers: Optional[Sequence[str]] = None, reps: int = 7,
    warmup: int = 2, memory: bool = True, check: bool = False, progress: bool = True,
    seed: int = 0,
) -> BenchResult:
    """Run every provider on every case in every mode; return CSV rows (columns:
    :data:`~.reporting.CSV_COLUMNS`; ``versions`` holds the provenance of the run).
    ``dtype`` None: float32. A provider that cannot run is skipped, the reason logged."""
    dtype = torch.float32 if dtype is None else dtype
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode {m!r}: expected one of {MODES}")
    builders, skipped = providers_for(device, providers)
    if set(builders) == {"base"} and skipped:  # all asked for are skipped: nothing to compare
        return BenchResult([], skipped, [])
    dev_name = torch.device(device).type
    vers = provenance_string(device)
    dname = dtype_name(dtype)
    rows: List[Dict[str, str]] = []
    sync = sync_fn(device)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(cases) * len(modes) * (warmup + reps) * len(builders),
                       desc="bench", unit="call", leave=True, file=sys.stderr)
        except ImportError:  # pragma: no cover
            bar = None
    done_cases: List[Tuple[str, Case]] = []

    def row(kernel, prov, mode, metric, x, y50, y20, y80):
        rows.append(dict(kernel=kernel, provider=prov, mode=mode, metric=metric, x=x,
                         y_50=f"{y50:.6g}", y_20=f"{y20:.6g}", y_80=f"{y80:.6g}",
                         device=dev_name, dtype=dname, versions=vers))

    for case in cases:
        kernel, xval = case.kernel_name(sweep), case.x_value(sweep)
        done_cases.append((kernel, case))
        inp = make_inputs(case, device=device, dtype=dtype, seed=seed)
        runners: Dict[str, Runner] = {}
        for name, build in builders.items():
            try:
                runners[name] = build(inp)
            except Skip as e:
                skipped.setdefault(name, str(e))
            except Exception as e:
                skipped.setdefault(name, f"{type(e).__name__}: {e}")
        for n in list(runners) if check else ():
            try:
                e = _max_rel_err(runners[n], inp)
            except Exception as ex:
                logger.warning("bench: %s not checked against the fp64 reference: %s: %s",
                               n, type(ex).__name__, ex)
                continue
            row(kernel, n, "forward", "max_rel_err", xval, e, e, e)
        for mode in modes:
            def tick(n, name, mode=mode):
                if bar is not None:
                    bar.update(n)
                    bar.set_postfix_str(f"{xval} {mode}", refresh=False)

            steps = {n: step(r, mode, inp.dy) for n, r in runners.items()}
            t = time_interleaved(steps, reps=reps, warmup=warmup, sync=sync, tick=tick,
                                 cuda_events=dev_name == "cuda")
            for n, msg in t.failed.items():
                skipped.setdefault(n, f"failed at {kernel} {xval} {mode}: {msg}")
                logger.warning("bench: skipping %s: %s", n, msg)
                runners.pop(n)
            for n in t.wall_ms:
                row(kernel, n, mode, "time_ms", xval, *quantiles(t.wall_ms[n]))
                if dev_name == "cpu":
                    row(kernel, n, mode, "cpu_ms", xval, *quantiles(t.cpu_ms[n]))
                else:
                    row(kernel, n, mode, "host_ms", xval, *quantiles(t.host_ms[n]))
            for n in t.wall_ms if memory else ():
                try:
                    mb = peak_bytes(device, *steps[n]) / 2**20
                    row(kernel, n, mode, "peak_MB", xval, mb, mb, mb)
                    if mode == "forward":
                        sv = saved_bytes(runners[n], inp) / 2**20
                        row(kernel, n, mode, "saved_MB", xval, sv, sv, sv)
                except Exception as e:  # memory is best effort; say so
                    logger.warning("bench: memory of %s not measured: %s: %s",
                                   n, type(e).__name__, e)
        del inp, runners
        gc.collect()
    if bar is not None:
        bar.close()
    return BenchResult(rows, skipped, done_cases)
