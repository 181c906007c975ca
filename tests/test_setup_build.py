"""setup.py's choices for a CUDA build on a machine without a GPU (a cluster's build node),
checked with whatever torch is installed (CPU is fine): the default architecture list, the
CUDA toolkit found from nvcc, the include order. The full CUDA build itself is in
docs/wheels.md (it needs a CUDA torch, several GB)."""
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: importing it defines the functions and does not call setup()."""
    spec = importlib.util.spec_from_file_location("slim_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _toolkit(root: Path) -> Path:
    """A fake CUDA toolkit: bin/nvcc and include/cuda_runtime.h."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    return root


def test_arch_list_default_and_override(setup_py):
    assert setup_py.cuda_arch_list({}) == "8.0;8.6;8.9;9.0+PTX"
    assert setup_py.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": " "}) == "8.0;8.6;8.9;9.0+PTX"
    assert setup_py.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "9.0"}) == "9.0"


def test_cuda_home_from_env(setup_py, tmp_path):
    assert setup_py.find_cuda_home({"CUDA_HOME": "/opt/cuda-x", "PATH": ""}) == "/opt/cuda-x"
    assert setup_py.find_cuda_home({"CUDA_PATH": "/opt/cuda-y", "PATH": ""}) == "/opt/cuda-y"


def test_cuda_home_from_a_symlinked_nvcc(setup_py, tmp_path):
    """/usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc: the toolkit, not /usr/local."""
    root = _toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "bin").mkdir()
    os.symlink(root / "bin" / "nvcc", tmp_path / "bin" / "nvcc")
    env = {"PATH": str(tmp_path / "bin")}
    assert setup_py.find_cuda_home(env) == str(root)


def test_cuda_home_from_a_wrapper_nvcc(setup_py, tmp_path):
    """A wrapper script outside the toolkit (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``):
    the toolkit is what nvcc reports as TOP in a dry run."""
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.write_text("#!/bin/sh\n")
    wrapper.chmod(0o755)
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "#$ _HERE_=/opt/cuda-13.0/bin\n"
                                                         "#$ TOP=/opt/cuda-13.0/bin/..\n")

    env = {"PATH": str(tmp_path / "bin")}
    assert setup_py.find_cuda_home(env, run=run) == "/opt/cuda-13.0"
    assert calls and calls[0][0] == str(wrapper) and "-dryrun" in calls[0]


def test_no_toolkit(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py, "_is_toolkit", lambda root: False)
    assert setup_py.find_cuda_home({"PATH": ""}, which=lambda *a, **k: None) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_cuda_home_of_this_machines_nvcc(setup_py):
    """The real nvcc: a toolkit root with include/cuda_runtime.h (here /usr/local/bin/nvcc
    is a wrapper of /usr/local/cuda-13.0/bin/nvcc; torch would guess /usr/local)."""
    env = {"PATH": os.environ["PATH"]}
    home = setup_py.find_cuda_home(env)
    assert home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")), home
    assert os.path.isfile(os.path.join(home, "bin", "nvcc"))


def test_toolkit_headers_before_pip_nvidia(setup_py, tmp_path):
    pip_dirs = [str(tmp_path / "nvidia" / n / "include") for n in ("cu13", "cudnn")]
    for d in pip_dirs:
        os.makedirs(d)
    found = setup_py._nvidia_include_dirs([str(tmp_path)])
    assert found == sorted(pip_dirs)
    order = setup_py.cuda_include_dirs("/usr/local/cuda-13.0", found)
    assert order == ["/usr/local/cuda-13.0/include"] + sorted(pip_dirs)
    assert setup_py.cuda_include_dirs(None, found) == sorted(pip_dirs)
