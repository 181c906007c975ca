"""The adapter folder format: folders of the own format of earlier releases (format 1 and 2)
still load bit-exactly, and a save is atomic: after a kill at any moment the folder loads as
wholly the old adapter or wholly the new one, and a reader racing a save gets one of the two
(docs/huggingface.md, "The adapter folder")."""
import builtins
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import slim_kernels as sk
from slim_kernels.integrations import adapter_format as fmt
from slim_kernels.layer import SLIM_KEYS

pytest.importorskip("safetensors")
pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
sys.path.insert(0, DATA)
LAYER = ".slim_experts.default"


def _slim_tensors(model):
    """The SLIM tensors of ``model`` by ``<wrapped module>.<name>`` (the own format's keys)."""
    return {f"{n[:-len(LAYER)]}.{t}": m.slim_tensors()[t].detach().clone()
            for n, m in sk.slim_modules(model) for t in SLIM_KEYS}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the own format of earlier releases ----------------------------------------------------------
def _legacy_model(version):
    from adapter_v1 import TinyBase

    exp = load_file(os.path.join(DATA, f"slim_adapter_v{version}_expected.safetensors"))
    model = TinyBase()
    model.load_state_dict({k[len("base."):]: v for k, v in exp.items() if k.startswith("base.")})
    return model, exp


@pytest.mark.parametrize("version", [1, 2])
def test_own_format_adapters_load_bit_exactly(tmp_path, version):
    """``slim_adapter_v1`` was written by slim_kernels 0.1, ``slim_adapter_v2`` by the release
    before the PEFT layout (format 2: digested manifest, content-named tensor file)."""
    from adapter_v1 import CONFIG

    src = os.path.join(DATA, f"slim_adapter_v{version}")
    meta = json.load(open(os.path.join(src, "slim_config.json")))
    assert meta["format_version"] == version
    saved = load_file(os.path.join(src, "slim_adapter.safetensors" if version == 1
                                   else meta["tensor_file"]))
    model, exp = _legacy_model(version)
    sk.load_slim(model, src)
    assert model.slim_summary.config == sk.SlimConfig(**CONFIG)
    assert _equal(_slim_tensors(model), saved)
    model.eval()
    with torch.no_grad():  # (the tensors are bit-exact; a GEMM may round 1 ulp differently)
        torch.testing.assert_close(model(exp["x"]), exp["y"], rtol=1e-6, atol=1e-6)
    # saving over it writes PEFT's layout and removes the own format's files
    dst = tmp_path / "a"
    shutil.copytree(src, dst)
    (dst / "notes.txt").write_text("mine")  # a file of the user's stays
    sk.save_slim(model, str(dst))
    assert sorted(os.listdir(dst)) == ["README.md", "adapter_config.json",
                                       "adapter_model.safetensors", "notes.txt"]
    assert json.loads((dst / "adapter_config.json").read_text())["slim_integrity"][
        "format_version"] == 3
    assert (dst / "notes.txt").read_text() == "mine"
    again, _ = _legacy_model(version)
    sk.load_slim(again, str(dst))
    assert _equal(_slim_tensors(again), saved)


def _own_format(folder, model, version):
    """Write ``model``'s adapter into ``folder`` in the own format ``version`` (1 or 2), as the
    releases before the PEFT layout wrote it."""
    tensors = _slim_tensors(model)
    layer = next(m for _, m in sk.slim_modules(model))
    config = layer.config.replace(target_modules=tuple(n[:-len(LAYER)] for n, _ in
                                                        sk.slim_modules(model))).to_dict()
    meta = {"format": "slim_kernels.slim_adapter", "format_version": version,
            "library_version": "0.1.0", "config": config,
            "modules": [n[:-len(LAYER)] for n, _ in sk.slim_modules(model)],
            "tensors": {k: {"shape": list(v.shape), "dtype": fmt.dtype_name(v.dtype),
                            "sha256": fmt.sha256(v)} for k, v in tensors.items()}}
    os.makedirs(folder, exist_ok=True)
    if version == 1:
        save_file(tensors, os.path.join(folder, "slim_adapter.safetensors"))
    else:
        body = {k: meta[k] for k in ("format", "format_version", "config", "modules", "tensors")}
        meta["digest"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                                        .encode("ascii")).hexdigest()
        meta["tensor_file"] = f"slim_adapter.{meta['digest'][:16]}.safetensors"
        save_file(tensors, os.path.join(folder, meta["tensor_file"]),
                  metadata={"format": meta["format"], "format_version": "2",
                            "digest": meta["digest"]})
    (folder / "slim_config.json").write_text(json.dumps(meta))


def test_format_1_values_are_checked_too(tmp_path):
    """Format 1 has per-tensor checksums but no digest: the value checks still apply."""
    dst = tmp_path / "a"
    shutil.copytree(os.path.join(DATA, "slim_adapter_v1"), dst)
    t = load_file(str(dst / "slim_adapter.safetensors"))
    t["q_proj.cluster_vars"][0, 0] = -2.0
    save_file(t, str(dst / "slim_adapter.safetensors"))
    meta = json.loads((dst / "slim_config.json").read_text())
    meta["tensors"]["q_proj.cluster_vars"]["sha256"] = fmt.sha256(t["q_proj.cluster_vars"])
    (dst / "slim_config.json").write_text(json.dumps(meta))
    model, _ = _legacy_model(1)
    with pytest.raises(sk.SlimLoadError, match="module 'q_proj': tensor 'cluster_vars' holds negative"):
        sk.load_slim(model, str(dst))
    assert not list(sk.slim_modules(model))


def test_format_2_edited_manifest_fails_its_digest(tmp_path):
    dst = tmp_path / "a"
    shutil.copytree(os.path.join(DATA, "slim_adapter_v2"), dst)
    meta = json.loads((dst / "slim_config.json").read_text())
    meta["config"]["alpha"] = 99.0
    (dst / "slim_config.json").write_text(json.dumps(meta))
    model, _ = _legacy_model(2)
    with pytest.raises(sk.SlimLoadError, match="fails its integrity check"):
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
        model.train()(torch.randn(16, 8, generator=g))
        sk.step_clusters(model)  # clusters initialised
        out.append(model)
    return out


class _Killed(BaseException):
    """Stands for SIGKILL: raised at the k-th file system call, and at every later one, so
    that no cleanup code runs after it either."""


_FS_CALLS = ("open", "replace", "rename", "remove", "unlink", "fsync", "makedirs", "mkdir",
             "listdir", "close", "link", "rmdir", "chmod")


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
    wrap(fmt, "exchange")  # the atomic step itself counts as one call
    return calls


@pytest.mark.parametrize("old_format", [1, 2, 3])
def test_killed_between_any_two_file_operations_old_or_new(tmp_path, monkeypatch, old_format):
    """Every prefix of the save's file system calls, then nothing more (as after SIGKILL): the
    folder loads as the old adapter up to the exchange of the folders and as the new one
    after it, with load_slim and with PeftModel.from_pretrained."""
    from adapter_v1 import TinyBase
    from peft import PeftModel

    old, new = _two_adapters()
    want_old, want_new = _slim_tensors(old), _slim_tensors(new)
    template = tmp_path / "template"
    if old_format == 3:
        sk.save_slim(old, str(template))
    else:
        _own_format(template, old, old_format)
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
        got = _slim_tensors(sk.load_slim(TinyBase(), str(d)))
        seen.append("old" if _equal(got, want_old) else "new" if _equal(got, want_new) else "neither")
        assert seen[-1] != "neither", f"killed at file system call {k + 1}: {os.listdir(d)}"
        if seen[-1] == "new":  # the same folder through PEFT's own loader
            torch.manual_seed(0)
            peft_model = PeftModel.from_pretrained(TinyBase(), str(d))
            assert _equal(_slim_tensors(peft_model.get_base_model()), want_new)
        if done:
            break
        k += 1
    # the switch happens once, from old to new, and the loop reached the end of the save
    assert seen[0] == "old" and seen[-1] == "new" and k == calls[0]
    assert seen == sorted(seen, key=["old", "new"].index)
    # leftovers of a killed save (a half-written folder beside it) go with the next save
    d = tmp_path / f"k{len(seen) // 2}"
    assert glob.glob(str(tmp_path / f".k{len(seen) // 2}.slim-tmp-*"))
    sk.save_slim(new, str(d))
    assert not glob.glob(str(tmp_path / f".k{len(seen) // 2}.slim-*"))
    assert sorted(os.listdir(d)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def _classify(folder, old_config):
    """Where in the save a kill left ``folder``."""
    beside = glob.glob(os.path.join(os.path.dirname(folder),
                                    f".{os.path.basename(folder)}.slim-tmp-*"))
    if open(os.path.join(folder, "adapter_config.json")).read() == old_config:
        return "writing the new folder" if beside else "before any write"
    return "exchanged, old folder not deleted yet" if beside else "save complete"


def test_sigkill_during_save_leaves_old_or_new(tmp_path):
    """SIGKILL a process saving a 34 MB adapter over another at a random moment of the save,
    SLIM_SAVE_KILL_RUNS times (default 6, about 15 s; run it with 100 to be thorough): a
    random delay after the start of the preparation, the writing of the new folder, or the
    exchange, in turn."""
    import _save_kill_worker as w

    runs = int(os.environ.get("SLIM_SAVE_KILL_RUNS", "6"))
    want = {seed: _slim_tensors(w.adapter(seed)) for seed in (1, 2)}
    template = tmp_path / "template"
    sk.save_slim(w.adapter(1), str(template))
    old_config = (template / "adapter_config.json").read_text()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def save(folder, *kill):
        return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_save_kill_worker.py"),
                               str(folder), "2", *map(str, kill)], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=120)

    def check(folder):
        got = _slim_tensors(sk.load_slim(w.Base(), str(folder)))
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
        t_write, t_exchange, t_end = map(float, p.stdout.split()[1:])
        phases = [min(a, b) for a, b in zip(phases, (t_write, t_exchange - t_write, t_end - t_exchange))]
    rng = random.Random(int(os.environ.get("SLIM_SAVE_KILL_SEED", "0")))
    points, results = {}, {}
    for i in range(runs):
        d = tmp_path / f"run{i}"
        shutil.copytree(template, d)
        phase = i % 3
        p = save(d, phase, f"{rng.uniform(0.0, 1.2 * phases[phase]):.6f}")
        assert p.returncode in (0, -signal.SIGKILL), p.stderr
        point = _classify(str(d), old_config)
        points[point] = points.get(point, 0) + 1
        got = check(d)
        results[got] = results.get(got, 0) + 1
        shutil.rmtree(d)
    print(f"\n{runs} kills (phases {', '.join(f'{t:.3f}' for t in phases)} s): {results}; "
          f"kill points: {points}")
    assert sum(results.values()) == runs


def test_a_reader_that_read_the_old_config_reads_the_new_adapter(tmp_path):
    """A reader that read the old adapter_config.json just before a save replaced the folder
    reads the folder again and gets the new adapter (not the old config with new tensors)."""
    old, new = _two_adapters()
    d = tmp_path / "a"
    sk.save_slim(old, str(d))
    stale = json.loads((d / "adapter_config.json").read_text())
    sk.save_slim(new, str(d))
    config, tensors = fmt.read_folder(d, config=stale)
    assert config == json.loads((d / "adapter_config.json").read_text()) != stale
    assert tensors.keys() == load_file(str(d / "adapter_model.safetensors")).keys()


_WRITER = """
import sys, time
sys.path.insert(0, {data!r})
import torch, slim_kernels as sk
from test_save_format import _two_adapters
models = _two_adapters()
print("ready", flush=True)
deadline = time.time() + {seconds}
i = 0
while time.time() < deadline:
    sk.save_slim(models[i % 2], {folder!r})
    i += 1
print("saves", i, flush=True)
"""


def test_a_save_and_a_save_back_between_the_reads_is_read_again(tmp_path, monkeypatch):
    """A reader reads the old config, then the tensors of a newer save; by the time it checks
    the config again a third save has brought the old adapter back, so the config reads the
    same as before (the interleaving a loaded machine gives the racing test below). The
    reader must read again and get the old adapter whole, not report a mismatched folder."""
    from adapter_v1 import TinyBase

    old, new = _two_adapters()
    d = str(tmp_path / "a")
    sk.save_slim(old, d)
    real, calls = fmt._read_tensors, []

    def racing_read(p):
        calls.append(p)
        if len(calls) == 1:
            sk.save_slim(new, d)
            got = real(p)
            sk.save_slim(old, d)
            return got
        return real(p)

    monkeypatch.setattr(fmt, "_read_tensors", racing_read)
    got = _slim_tensors(sk.load_slim(TinyBase(), d))
    assert _equal(got, _slim_tensors(old)) and len(calls) == 2


def test_a_mismatched_folder_at_rest_is_refused_at_once(tmp_path, monkeypatch):
    """A folder whose tensor file is another save's, with no save going on, is refused on the
    first read (no re-reads: nothing changed), naming both files."""
    from adapter_v1 import TinyBase

    old, new = _two_adapters()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    sk.save_slim(old, a)
    sk.save_slim(new, b)
    shutil.copy2(os.path.join(b, fmt.WEIGHTS_NAME), os.path.join(a, fmt.WEIGHTS_NAME))
    real, calls = fmt._read_tensors, []
    monkeypatch.setattr(fmt, "_read_tensors", lambda p: calls.append(p) or real(p))
    with pytest.raises(fmt.SlimLoadError, match=r"adapter_model\.safetensors does not belong"):
        sk.load_slim(TinyBase(), a)
    assert len(calls) == 1


@pytest.mark.parametrize("loader", ["load_slim", "PeftModel"])
def test_readers_racing_a_writer_get_one_of_the_adapters(tmp_path, loader):
    """A process saves two adapters in turn into one folder for a few seconds while this one
    loads it again and again: every load is wholly one of the two, never an error."""
    from adapter_v1 import TinyBase
    from peft import PeftModel

    old, new = _two_adapters()
    wants = (_slim_tensors(old), _slim_tensors(new))
    d = tmp_path / "a"
    sk.save_slim(old, str(d))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    code = _WRITER.format(data=DATA, seconds=6.0, folder=str(d))
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=os.path.join(ROOT, "tests"))
    try:
        assert writer.stdout.readline().strip() == "ready"
        loads = []
        while writer.poll() is None:
            if loader == "load_slim":
                got = _slim_tensors(sk.load_slim(TinyBase(), str(d)))
            else:
                got = _slim_tensors(PeftModel.from_pretrained(TinyBase(), str(d)).get_base_model())
            which = [i for i, w in enumerate(wants) if _equal(got, w)]
            assert which, "a load that is neither adapter"
            loads.append(which[0])
            time.sleep(0.001)
        out = writer.stdout.read()
    finally:
        writer.kill()
        writer.wait()
    saves = int(out.split()[-1])
    print(f"\n{len(loads)} loads ({loads.count(0)} old, {loads.count(1)} new) during {saves} saves")
    assert saves > 5 and len(loads) > 5


def test_peft_save_pretrained_killed_never_leaves_a_broken_config_nor_a_silent_mix(tmp_path,
                                                                                  monkeypatch):
    """PEFT's own save_pretrained writes the tensor file in place (PEFT's code), then the
    config: slim_kernels writes the config atomically with the record of the tensor file, so
    after a kill at any point adapter_config.json is whole, and the folder loads as the old or
    the new adapter or is refused (the record does not fit the tensors): never an empty
    config, never a silent mix. (save_slim is the atomic save: old or new, always.)"""
    from adapter_v1 import CONFIG, TinyBase
    from peft import get_peft_model
    from slim_kernels.peft import SlimPeftConfig

    def peft_model(seed):
        torch.manual_seed(0)
        m = get_peft_model(TinyBase(), SlimPeftConfig(**{**CONFIG, "target_modules": list(
            CONFIG["target_modules"])}))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in sk.slim_modules(m):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        return m

    old, new = peft_model(1), peft_model(2)
    want = {"old": _slim_tensors(old.get_base_model()), "new": _slim_tensors(new.get_base_model())}
    template = tmp_path / "template"
    old.save_pretrained(template)
    outcomes, k = set(), 0
    while True:
        d = tmp_path / f"k{k}"
        shutil.copytree(template, d)
        with monkeypatch.context() as mp:
            _kill_at(mp, k)
            try:
                new.save_pretrained(d)
                done = True
            except _Killed:
                done = False
        json.loads((d / "adapter_config.json").read_text())  # whole, whatever happened
        try:
            got = _slim_tensors(sk.load_slim(TinyBase(), str(d)))
            outcomes.add(next(n for n, w in want.items() if _equal(got, w)))
        except sk.SlimLoadError:
            outcomes.add("refused")
        if done:
            break
        k += 1
    assert outcomes <= {"old", "new", "refused"} and {"old", "new"} <= outcomes, outcomes


def test_without_an_atomic_exchange_the_save_renames_the_old_folder_aside(tmp_path, monkeypatch):
    """Where the platform or file system has no atomic exchange of two paths, the old folder
    is renamed aside first: the save still completes, and nothing is left beside it."""
    import errno

    from adapter_v1 import TinyBase

    old, new = _two_adapters()
    d = tmp_path / "a"
    sk.save_slim(old, str(d))

    def unsupported(a, b):
        raise OSError(errno.EINVAL, "no RENAME_EXCHANGE here")

    monkeypatch.setattr(fmt, "_EXCHANGE", [unsupported])
    sk.save_slim(new, str(d))
    assert _equal(_slim_tensors(sk.load_slim(TinyBase(), str(d))), _slim_tensors(new))
    assert sorted(os.listdir(tmp_path)) == ["a"]
