"""Build the wheel, install it offline into a fresh virtual environment that already has torch,
and run a smoke forward/backward from outside the repository.

    pip wheel --no-build-isolation --no-deps -w WHEELHOUSE .
    python -m venv VENV        # + a .pth naming the running interpreter's site-packages
    VENV/bin/pip install --no-index --no-deps WHEELHOUSE/slim_kernels-*.whl

torch (and its dependencies) come from the interpreter running the tests, whether that is a
virtual environment or not. ``--system-site-packages`` is not enough: a venv made from inside a
venv gets the *base* interpreter's site-packages, which has no torch when the suite runs in a
venv. So the nested venv is plain, and a .pth file in it lists the site-packages directories
on the running interpreter's sys.path. Those are appended after the venv's own site-packages
(the installed wheel wins), and their own .pth files are not run (an editable install of the
checkout there stays out).

Extension check: when setup.py builds a compiled extension (the build directory holds one, a
developer build left one in the source tree, or SLIM_KERNELS_EXPECT_EXT=1), the wheel must
carry it, be platform-tagged, and the installed copy must offer the 'cpp' backend.

A wheel without the extension (what a plain ``pip install .`` builds: torch is not importable
under build isolation) must carry the C++ sources, compile them on first use into a fresh
cache with a message, load them from that cache in the next process, and say why ``cpp`` is
missing when it cannot compile.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT_SUFFIXES = (".so", ".pyd")
SKIP = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              ".benchmarks", "out", ".whl", ".gl", "*.so", "*.pyd", ".venv*")

SMOKE = r"""
import socket, sys
def _no_network(*a, **k):
    raise RuntimeError("slim_kernels tried to open a network connection")
socket.socket.connect = _no_network
socket.create_connection = _no_network

import torch
import slim_kernels as sk
print("FILE", sk.__file__)
print("BACKENDS", ",".join(sk.available_backends()))
torch.manual_seed(0)
lin = torch.nn.Linear(24, 20)
cfg = sk.SlimConfig(num_lora_experts=3, num_identity_experts=1, rank=4, top_k=2,
                    num_clusters=2, balance_coef=0.01)
layer = sk.SlimLinear.from_linear(lin, cfg).train()
x = torch.randn(2, 7, 24, requires_grad=True)
y = layer(x)
sk.step_clusters(layer)  # the first call's batch initialises the clusters: yielding on
torch.nn.init.normal_(layer.lora_B, std=0.1)
y = layer(x)
(y.square().mean() + sk.aux_loss(layer)).backward()
assert y.shape == (2, 7, 20) and x.grad is not None and layer.lora_A.grad is not None
assert bool(layer.clusters.cluster_initialized)
print("SMOKE OK", sk.__version__)
"""


def _run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1")
    return env


def _site_dirs():
    """The site-packages directories the running interpreter imports from (venv or not)."""
    dirs = [p for p in sys.path
            if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")
            and os.path.isdir(p)]
    return list(dict.fromkeys(os.path.abspath(p) for p in dirs))


def _venv_site_packages(py, env):
    return _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                env=env).stdout.strip()


def _compiled(paths):
    return [p for p in paths if p.endswith(EXT_SUFFIXES)]


def _build_wheel(tmp_path, env):
    """``pip wheel --no-build-isolation`` from a clean copy of the source (no stale build/ or
    developer .so gets in); the wheel's path and its file names, checked to hold the C++
    sources."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    wheelhouse = tmp_path / "wheelhouse"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
          "-w", str(wheelhouse), str(src)], env=env, cwd=tmp_path)
    wheels = glob.glob(str(wheelhouse / "slim_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
    # every wheel carries the C++ sources: it compiles them on first use when it has no
    # extension, or one built for another torch
    for rel in ("slim_kernels/_csrc/cpu/slim_cpu.cpp", "slim_kernels/_csrc/common/topk.h"):
        assert rel in names, f"{rel} is missing from the wheel: nothing to compile on first use"
    return wheels[0], names


def _install_in_fresh_venv(tmp_path, whl, env):
    """A fresh venv that sees the running interpreter's torch (see the module docstring), with
    the wheel installed offline; its python."""
    venv = tmp_path / "venv"
    mk = subprocess.run([sys.executable, "-m", "venv", str(venv)],
                        env=env, capture_output=True, text=True)
    py = str(venv / "bin" / "python")
    if mk.returncode != 0:  # no ensurepip (e.g. Debian without python3-venv)
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    site_dir = _venv_site_packages(py, env)
    outer = _site_dirs()
    assert outer, f"no site-packages on sys.path: {sys.path}"
    (Path(site_dir) / "_outer_site_packages.pth").write_text("\n".join(outer) + "\n")
    install = ["install", "--no-index", "--no-deps", "--force-reinstall", whl]
    if mk.returncode == 0:
        _run([py, "-m", "pip", *install], env=env, cwd=tmp_path)
    else:  # drive the venv with our pip
        _run([sys.executable, "-m", "pip", "--python", py, *install], env=env, cwd=tmp_path)
    return py


@pytest.mark.slow
def test_wheel_installs_offline_and_runs(tmp_path):
    env = _clean_env()
    env["SLIM_KERNELS_JIT"] = "0"  # what the wheel itself carries, nothing compiled later
    whl, names = _build_wheel(tmp_path, env)
    src = tmp_path / "src"
    assert "slim_kernels/__init__.py" in names and "slim_kernels/layer.py" in names
    # the PEFT hook: a .pth at the root of site-packages and the module it imports
    assert "slim_kernels_peft.pth" in names and "_slim_kernels_peft.py" in names
    assert not any(n.startswith(("tests/", "python/")) for n in names)
    # package data: the demo's embedded base model and the triton backend's configuration
    # files must travel with the wheel (offline nodes)
    data = glob.glob(os.path.join(ROOT, "slim_kernels", "ops", "backends", "triton", "configs",
                                  "*.json"))
    assert data, "no triton configuration files in the source tree"
    for f in glob.glob(os.path.join(ROOT, "slim_kernels", "demo", "base_model", "*")) + data:
        rel = os.path.relpath(f, ROOT).replace(os.sep, "/")
        assert rel in names, f"{rel} is missing from the wheel"

    built = _compiled(glob.glob(str(src / "build" / "**" / "slim_kernels" / "**" / "*"), recursive=True))
    in_tree = _compiled(glob.glob(os.path.join(ROOT, "slim_kernels", "**", "*"), recursive=True))
    expect_ext = os.environ.get("SLIM_KERNELS_EXPECT_EXT") == "1" or bool(built) or bool(in_tree)
    ext_in_wheel = [n for n in _compiled(names) if n.startswith("slim_kernels/")]
    if expect_ext:
        assert ext_in_wheel, (f"an extension is expected (SLIM_KERNELS_EXPECT_EXT=1 or built: "
                              f"{built or in_tree}) but the wheel has none: {whl}")
        assert not whl.endswith("-none-any.whl"), "a wheel with an extension must be platform-tagged"
    else:
        assert whl.endswith("-py3-none-any.whl"), whl

    py = _install_in_fresh_venv(tmp_path, whl, env)
    venv = Path(py).parents[1]
    work = tmp_path / "elsewhere"  # not the repository: import the installed copy
    work.mkdir()
    (work / "smoke.py").write_text(SMOKE)
    p = _run([py, "smoke.py"], env=env, cwd=work)
    out = p.stdout
    assert "SMOKE OK" in out, out
    installed = out.split("FILE ", 1)[1].splitlines()[0]
    assert installed.startswith(str(venv)), f"imported {installed}, not the venv's copy"
    backends = out.split("BACKENDS ", 1)[1].splitlines()[0].split(",")
    assert "torch" in backends
    info = _run([str(venv / "bin" / "slim-kernels"), "info"], env=env, cwd=work).stdout
    assert info.startswith("slim_kernels ") and "backends available here" in info, info
    if ext_in_wheel:
        assert "cpp" in backends, f"the wheel carries {ext_in_wheel} but the cpp backend is unavailable"
    # importing peft registers SLIM, through the installed .pth (no slim_kernels import)
    reg = _run([py, "-c", "import sys, peft; from peft import mapping; print('SLIM' in "
                "mapping.PEFT_TYPE_TO_TUNER_MAPPING, sys.modules['slim_kernels'].__file__)"],
               env=env, cwd=work).stdout.split()
    assert reg[0] == "True" and reg[1].startswith(str(venv)), reg


FIRST_USE = r"""
import torch, slim_kernels as sk
from slim_kernels.ops.backends import _ext
x, W = torch.randn(5, 16), torch.randn(12, 16)
A, B, R = torch.randn(6, 16), torch.randn(12, 6), torch.randn(5, 16)
y = sk.slim_linear_op(x, W, None, A, B, R, num_lora_experts=3, top_k=2, scaling=1.0,
                      backend="cpp")[0]
ref = sk.slim_linear_op(x, W, None, A, B, R, num_lora_experts=3, top_k=2, scaling=1.0,
                        backend="torch")[0]
torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
print("ORIGIN", _ext.origin())
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++").split()[0]) is None,
                    reason="no C++ compiler (CXX, else c++) to compile on first use")
def test_wheel_without_extension_compiles_on_first_use(tmp_path):
    """What a plain ``pip install .`` (build isolation: no torch, so no extension at install)
    gives: the C++ sources in the wheel, compiled on first use into a fresh cache with a
    message, loaded from there by the next process; ``info`` says where ``_C`` came from, and
    why ``cpp`` is missing when it cannot be compiled. Takes one compile (~15-40 s)."""
    env = _clean_env()
    env.pop("SLIM_KERNELS_JIT", None)  # CI turns it off for the suite: this test is about it
    env["SLIM_KERNELS_BUILD_EXT"] = "0"  # the wheel an isolated build makes (no torch there)
    cache = tmp_path / "cache"
    env["SLIM_KERNELS_CACHE"] = str(cache)
    # ninja, like torch, comes from the running interpreter's environment
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    whl, names = _build_wheel(tmp_path, env)
    assert whl.endswith("-py3-none-any.whl") and not _compiled(names), names
    py = _install_in_fresh_venv(tmp_path, whl, env)
    slim = str(Path(py).parent / "slim-kernels")
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "first_use.py").write_text(FIRST_USE)

    first = _run([py, "first_use.py"], env=env, cwd=work)
    assert "slim_kernels._C was not built at install time; compiling it now" in first.stderr
    assert "compiled slim_kernels._C in" in first.stderr, first.stderr
    origin = first.stdout.split("ORIGIN ", 1)[1].strip()
    assert origin.startswith(f"compiled on first use: {cache}"), origin

    again = _run([py, "first_use.py"], env=env, cwd=work)  # from the cache, silently
    assert "compiling" not in again.stderr, again.stderr
    assert again.stdout.split("ORIGIN ", 1)[1].strip() == origin
    info = _run([slim, "info"], env=env, cwd=work).stdout
    available = info.split("backends available here: ", 1)[1].splitlines()[0].split(", ")
    assert "cpp" in available, info
    assert f"slim_kernels._C: {origin}" in info, info

    # an install without the extension, where it cannot be compiled: info says why, per case
    cases = {"SLIM_KERNELS_JIT": ("0", "compiling it on first use is off (SLIM_KERNELS_JIT=0)"),
             "CXX": ("/bin/false", "the C++ compiler CXX=/bin/false does not run")}
    for var, (value, why) in cases.items():
        info = _run([slim, "info"], env={**env, var: value, "SLIM_KERNELS_CACHE":
                                         str(tmp_path / f"cache-{var}")}, cwd=work).stdout
        line = next((ln for ln in info.splitlines() if ln.startswith("  cpp: ")), None)
        assert line is not None and why in line, info
        assert "slim_kernels._C was not built at install time" in line, line

    # an installed _C that does not load (one built for another torch): the compiled one
    site = Path(_venv_site_packages(py, env))
    (site / "slim_kernels" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"no ELF")
    stale = _run([py, "first_use.py"], env=env, cwd=work)
    assert stale.stdout.split("ORIGIN ", 1)[1].strip() == origin, stale.stdout
