"""The adapter folder format: adapters of slim_kernels 0.1 (format 1) still load bit-exactly,
and a save is atomic: after a kill at any moment the folder loads as wholly the old adapter or
wholly the new one (docs/huggingface.md, "What save_slim writes")."""
import builtins
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import slim_kernels as sk
from slim_kernels.integrations import save_load as sl

pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
sys.path.insert(0, DATA)


def _slim_tensors(model):
    return {f"{n}.{t}": m.slim_tensors()[t].detach().clone()
            for n, m in sk.slim_modules(model) for t in sl.TENSORS}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- format 1 (slim_kernels 0.1) ---------------------------------------------------------------
def _v1_model():
    from adapter_v1 import TinyBase

    exp = load_file(os.path.join(DATA, "slim_adapter_v1_expected.safetensors"))
    model = TinyBase()
    model.load_state_dict({k[len("base."):]: v for k, v in exp.items() if k.startswith("base.")})
    return model, exp


def test_format_1_adapter_loads_bit_exactly(tmp_path):
    from adapter_v1 import CONFIG

    src = os.path.join(DATA, "slim_adapter_v1")
    assert json.load(open(os.path.join(src, "slim_config.json")))["format_version"] == 1
    model, exp = _v1_model()
    sk.load_slim(model, src)
    assert model.slim_summary.config == sk.SlimConfig(**CONFIG)
    saved = load_file(os.path.join(src, "slim_adapter.safetensors"))
    assert _equal(_slim_tensors(model), saved)
    model.eval()
    with torch.no_grad():  # (the tensors are bit-exact; a GEMM may round 1 ulp differently)
        torch.testing.assert_close(model(exp["x"]), exp["y"], rtol=1e-6, atol=1e-6)
    assert sl.adapter_tensor_file(src) == os.path.join(src, "slim_adapter.safetensors")
    # saving over it writes format 2 and removes the format-1 tensor file
    dst = tmp_path / "a"
    shutil.copytree(src, dst)
    sk.save_slim(model, str(dst))
    meta = json.loads((dst / "slim_config.json").read_text())
    assert meta["format_version"] == 2
    assert sorted(os.listdir(dst)) == sorted([meta["tensor_file"], "slim_config.json"])
    again, _ = _v1_model()
    sk.load_slim(again, str(dst))
    assert _equal(_slim_tensors(again), saved)


def test_format_1_values_are_checked_too(tmp_path):
    """Format 1 has per-tensor checksums but no digest: the value checks still apply."""
    from safetensors.torch import save_file

    dst = tmp_path / "a"
    shutil.copytree(os.path.join(DATA, "slim_adapter_v1"), dst)
    t = load_file(str(dst / "slim_adapter.safetensors"))
    t["q_proj.cluster_vars"][0, 0] = -2.0
    save_file(t, str(dst / "slim_adapter.safetensors"))
    meta = json.loads((dst / "slim_config.json").read_text())
    meta["tensors"]["q_proj.cluster_vars"]["sha256"] = sl._sha256(t["q_proj.cluster_vars"])
    (dst / "slim_config.json").write_text(json.dumps(meta))
    model, _ = _v1_model()
    with pytest.raises(sk.SlimLoadError, match="module 'q_proj': tensor 'cluster_vars' holds negative"):
        sk.load_slim(model, str(dst))
    assert not list(sk.slim_modules(model))


# -- atomic save -------------------------------------------------------------------------------
def _two_adapters():
    from adapter_v1 import CONFIG, TinyBase

    out = []
    for seed in (1, 2):
        torch.manual_seed(0)
        model = sk.apply_slim(TinyBase(), sk.SlimConfig(**CONFIG), verbose=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, m in sk.slim_modules(model):
                for t in (m.lora_A, m.lora_B, m.router):
                    t.copy_(torch.randn(t.shape, generator=g))
        model.train()(torch.randn(16, 8, generator=g))  # clusters initialised
        out.append(model)
    return out


def _format_1(folder):
    """Turn a saved folder into what slim_kernels 0.1 would have written."""
    meta = json.loads((folder / "slim_config.json").read_text())
    os.replace(folder / meta.pop("tensor_file"), folder / "slim_adapter.safetensors")
    del meta["digest"]
    meta["format_version"] = 1
    (folder / "slim_config.json").write_text(json.dumps(meta))


class _Killed(BaseException):
    """Stands for SIGKILL: raised at the k-th file system call, and at every later one, so
    that no cleanup code runs after it either."""


_FS_CALLS = ("open", "replace", "rename", "remove", "unlink", "fsync", "makedirs", "mkdir",
             "listdir", "close")


def _kill_at(monkeypatch, k):
    calls = [0]

    def wrap(mod, name):
        real = getattr(mod, name)

        def f(*a, **kw):
            calls[0] += 1
            if calls[0] > k:
                raise _Killed(f"{name} #{calls[0]}")
            return real(*a, **kw)
        monkeypatch.setattr(mod, name, f)

    for name in _FS_CALLS:
        if hasattr(os, name):
            wrap(os, name)
    wrap(builtins, "open")
    return calls


@pytest.mark.parametrize("old_format", [1, 2])
def test_killed_between_any_two_file_operations_old_or_new(tmp_path, monkeypatch, old_format):
    """Every prefix of the save's file system calls, then nothing more (as after SIGKILL): the
    folder loads as the old adapter up to the manifest's replace and as the new one after it."""
    from adapter_v1 import TinyBase

    old, new = _two_adapters()
    want_old, want_new = _slim_tensors(old), _slim_tensors(new)
    template = tmp_path / "template"
    sk.save_slim(old, str(template))
    if old_format == 1:
        _format_1(template)
    seen, k = [], 0
    while True:
        d = tmp_path / f"k{k}"
        shutil.copytree(template, d)
        with monkeypatch.context() as mp:
            calls = _kill_at(mp, k)
            try:
                sk.save_slim(new, str(d))
                done = True
            except _Killed:
                done = False
        model = TinyBase()
        sk.load_slim(model, str(d))
        got = _slim_tensors(model)
        seen.append("old" if _equal(got, want_old) else "new" if _equal(got, want_new) else "neither")
        assert seen[-1] != "neither", f"killed at file system call {k + 1}: {os.listdir(d)}"
        if done:
            break
        k += 1
    # the switch happens once, from old to new, and the loop reached the end of the save
    assert seen[0] == "old" and seen[-1] == "new" and k == calls[0]
    assert seen == sorted(seen, key=["old", "new"].index)
    # leftovers of a killed save are removed by the next save
    d = tmp_path / f"k{len(seen) // 2}"
    assert len(os.listdir(d)) > 2
    sk.save_slim(new, str(d))
    assert len(os.listdir(d)) == 2


def _classify(folder, old_manifest):
    files = os.listdir(folder)
    manifest = open(os.path.join(folder, "slim_config.json")).read()
    if manifest == old_manifest:
        if any(".json.tmp-" in f for f in files):
            return "writing the new manifest"
        if any(".safetensors.tmp-" in f for f in files):
            return "writing the new tensor file"
        if len(files) > 2:
            return "new tensor file in place, old manifest"
        return "before any write"
    return "new manifest, old files not deleted yet" if len(files) > 2 else "save complete"


def test_sigkill_during_save_leaves_old_or_new(tmp_path):
    """SIGKILL a process saving a 34 MB adapter over another at a random moment of the save,
    SLIM_SAVE_KILL_RUNS times (default 6, about 15 s; run it with 100 to be thorough): a
    random delay after the start of the preparation, the tensor file's write or the
    manifest's write, in turn."""
    import _save_kill_worker as w

    runs = int(os.environ.get("SLIM_SAVE_KILL_RUNS", "6"))
    want = {seed: _slim_tensors(w.adapter(seed)) for seed in (1, 2)}
    template = tmp_path / "template"
    sk.save_slim(w.adapter(1), str(template))
    old_manifest = (template / "slim_config.json").read_text()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def save(folder, *kill):
        return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_save_kill_worker.py"),
                               str(folder), "2", *map(str, kill)], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=120)

    def check(folder):
        model = w.Base()
        sk.load_slim(model, str(folder))
        got = _slim_tensors(model)
        for seed, name in ((1, "old"), (2, "new")):
            if _equal(got, want[seed]):
                return name
        raise AssertionError(f"neither the old nor the new adapter: {os.listdir(folder)}")

    # two saves without a kill: when their phases begin and when they end (the shorter of
    # each phase, since a busy machine only ever makes them longer)
    phases = [float("inf")] * 3
    for i in range(2):
        d = tmp_path / f"calibrate{i}"
        shutil.copytree(template, d)
        p = save(d)
        assert p.returncode == 0 and check(d) == "new", p.stderr
        t_tensor, t_manifest, t_end = map(float, p.stdout.split()[1:])
        phases = [min(a, b) for a, b in zip(phases, (t_tensor, t_manifest - t_tensor, t_end - t_manifest))]
    rng = random.Random(int(os.environ.get("SLIM_SAVE_KILL_SEED", "0")))
    points, results = {}, {}
    for i in range(runs):
        d = tmp_path / f"run{i}"
        shutil.copytree(template, d)
        phase = i % 3
        p = save(d, phase, f"{rng.uniform(0.0, 1.2 * phases[phase]):.6f}")
        assert p.returncode in (0, -signal.SIGKILL), p.stderr
        point = _classify(d, old_manifest)
        points[point] = points.get(point, 0) + 1
        got = check(d)
        results[got] = results.get(got, 0) + 1
        shutil.rmtree(d)
    print(f"\n{runs} kills (phases {', '.join(f'{t:.3f}' for t in phases)} s): {results}; "
          f"kill points: {points}")
    assert sum(results.values()) == runs


def test_load_racing_a_save_reads_the_new_manifest(tmp_path, monkeypatch):
    """A reader that read the old manifest just before a save replaced it (and deleted the old
    tensor file) reads the new manifest and loads the new adapter."""
    from adapter_v1 import TinyBase

    old, new = _two_adapters()
    d = tmp_path / "a"
    sk.save_slim(old, str(d))
    stale = sl._read_manifest(str(d))
    sk.save_slim(new, str(d))
    assert not os.path.exists(stale[1])
    real, calls = sl._read_manifest, []

    def racing(path):
        calls.append(path)
        return stale if len(calls) == 1 else real(path)

    monkeypatch.setattr(sl, "_read_manifest", racing)
    model = TinyBase()
    sk.load_slim(model, str(d))
    assert _equal(_slim_tensors(model), _slim_tensors(new)) and len(calls) == 3
