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
"""
import glob
import os
import shutil
import subprocess
import sys
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


@pytest.mark.slow
def test_wheel_installs_offline_and_runs(tmp_path):
    # build from a clean copy of the source: no stale build/ or developer .so gets in
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    wheelhouse = tmp_path / "wheelhouse"
    env = _clean_env()
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
          "-w", str(wheelhouse), str(src)], env=env, cwd=tmp_path)
    wheels = glob.glob(str(wheelhouse / "slim_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    whl = wheels[0]
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
    assert "slim_kernels/__init__.py" in names and "slim_kernels/layer.py" in names
    assert not any(n.startswith(("tests/", "python/")) for n in names)
    # package data: the demo's embedded base model must travel with the wheel (offline nodes)
    for f in glob.glob(os.path.join(ROOT, "slim_kernels", "demo", "base_model", "*")):
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

    venv = tmp_path / "venv"
    mk = subprocess.run([sys.executable, "-m", "venv", str(venv)],
                        env=env, capture_output=True, text=True)
    py = str(venv / "bin" / "python")
    if mk.returncode != 0:  # no ensurepip (e.g. Debian without python3-venv)
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    # torch from the running interpreter's site-packages (see the module docstring)
    site_dir = _venv_site_packages(py, env)
    outer = _site_dirs()
    assert outer, f"no site-packages on sys.path: {sys.path}"
    (Path(site_dir) / "_outer_site_packages.pth").write_text("\n".join(outer) + "\n")
    install = ["install", "--no-index", "--no-deps", "--force-reinstall", whl]
    if mk.returncode == 0:
        _run([py, "-m", "pip", *install], env=env, cwd=tmp_path)
    else:  # drive the venv with our pip
        _run([sys.executable, "-m", "pip", "--python", py, *install], env=env, cwd=tmp_path)
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
