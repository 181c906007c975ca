"""What an install does when the fast path cannot be had: no C++ compiler (the install stops
with the fix), a compile that fails (the compiler's first error, remembered), no torch (says
which to install), and ``slim-kernels info`` saying why each missing backend is missing.
The compile on first use itself, from a wheel without the extension, is in test_wheel.py."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slim_kernels import _build

ROOT = Path(__file__).resolve().parents[1]


def test_compiler_missing_or_broken_is_said():
    with pytest.raises(_build.Unavailable, match=r"no C\+\+ compiler: `c\+\+` is not on PATH.*apt install g\+\+"):
        _build.find_compiler({"PATH": ""})
    with pytest.raises(_build.Unavailable, match=r"CXX=/bin/false does not run \(`/bin/false --version` exited 1\)"):
        _build.find_compiler({"CXX": "/bin/false", "PATH": os.environ["PATH"]})


@pytest.mark.skipif(shutil.which("c++") is None, reason="no c++ on PATH")
def test_compiler_found_with_its_version():
    argv, version = _build.find_compiler({"PATH": os.environ["PATH"]})
    assert os.path.isabs(argv[0]) and version and "not" not in version


def test_first_error_line():
    log = ("Error building extension 'slim_kernels_C': [1/3] c++ -MMD -c a.cpp -o a.o\n"
           "FAILED: a.o\nc++ -MMD -c a.cpp -o a.o\n"
           "a.cpp: In function 'int f()':\n"
           "a.cpp:3:10: error: 'g' was not declared in this scope\n"
           "a.cpp:4:1: error: expected ';'\nninja: build stopped: subcommand failed.\n")
    assert _build.first_error_line(log) == "a.cpp:3:10: error: 'g' was not declared in this scope"
    assert _build.first_error_line("FAILED: a.o\nsegfault\n") == "FAILED: a.o"
    assert _build.first_error_line("") == "(no output)"


def test_cache_key_follows_everything_the_binary_depends_on():
    torch_info = {"version": "2.13.0+cpu", "cuda": "None", "git": "abc", "cxx11_abi": "True"}
    sources = {"cpu/a.cpp": b"int a;", "common/t.h": b"#pragma once"}
    key = _build.cache_key(torch_info, "/usr/bin/c++ (g++ 12.2.0)", sources)
    assert key.startswith("torch2.13.0_cpu-") and key == _build.cache_key(
        dict(reversed(list(torch_info.items()))), "/usr/bin/c++ (g++ 12.2.0)", dict(sources))
    changed = [
        ({**torch_info, "version": "2.13.1+cpu"}, "/usr/bin/c++ (g++ 12.2.0)", sources),
        ({**torch_info, "cxx11_abi": "False"}, "/usr/bin/c++ (g++ 12.2.0)", sources),
        (torch_info, "/usr/bin/c++ (g++ 13.1.0)", sources),
        (torch_info, "/usr/bin/c++ (g++ 12.2.0)", {**sources, "cpu/a.cpp": b"int b;"}),
        (torch_info, "/usr/bin/c++ (g++ 12.2.0)", {**sources, "cpu/b.cpp": b""}),
    ]
    keys = {_build.cache_key(*c) for c in changed}
    assert key not in keys and len(keys) == len(changed)


@pytest.mark.skipif(shutil.which("c++") is None or shutil.which("ninja") is None,
                    reason="needs c++ and ninja on PATH")
def test_failed_compile_reports_the_first_error_and_is_remembered(tmp_path, monkeypatch):
    """A source that does not compile: the reason names the compiler's first error and the
    log; the next attempt answers from the log without compiling again."""
    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    (src / "cpu" / "broken.cpp").write_text('#error "planted by the test"\n')
    monkeypatch.setattr(_build, "source_dir", lambda: src)
    monkeypatch.setenv("SLIM_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SLIM_KERNELS_JIT", raising=False)
    with pytest.raises(_build.Unavailable) as e:
        _build.compile_on_first_use("not built (test)")
    msg = str(e.value)
    assert msg.startswith("not built (test), and compiling it failed: ")
    assert 'broken.cpp:1:2: error: #error "planted by the test"' in msg, msg
    logs = list((tmp_path / "cache" / "ext").glob("*.failed.log"))
    assert len(logs) == 1 and f"full log: {logs[0]}" in msg

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("compiled again"))
    with pytest.raises(_build.Unavailable) as again:
        _build.compile_on_first_use("not built (test)")
    assert str(again.value) == msg


def test_jit_off_is_said(monkeypatch):
    monkeypatch.setenv("SLIM_KERNELS_JIT", "0")
    with pytest.raises(_build.Unavailable, match=r"not built \(test\), and compiling it on "
                                                 r"first use is off \(SLIM_KERNELS_JIT=0\)"):
        _build.compile_on_first_use("not built (test)")


@pytest.mark.slow
def test_install_without_compiler_fails_with_the_fix(tmp_path):
    """No working C++ compiler: the install stops (instead of a pure-Python package that
    looks installed) and says how to get one, or how to install without it."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".venv*", "out"))
    env = {**os.environ, "CXX": "/bin/false", "PIP_NO_INDEX": "1"}
    env.pop("SLIM_KERNELS_BUILD_EXT", None)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                        "-w", str(tmp_path / "wh"), str(src)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "slim_kernels: cannot install: the C++ compiler CXX=/bin/false does not run" in out, out
    assert "SLIM_KERNELS_BUILD_EXT=0 pip install" in out, out


NO_TORCH = """
import sys
sys.modules["torch"] = None  # import torch -> ModuleNotFoundError, as without torch
import slim_kernels as sk
print(sk.SlimConfig().num_clusters)  # needs no torch
try:
    sk.SlimLinear
except ModuleNotFoundError as e:
    print("ERR", e)
from slim_kernels.cli import main
sys.exit(main(["info"]))
"""


def test_without_torch_import_and_info_say_which_torch_to_install():
    r = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[0] == "16"
    assert lines[1] == f"ERR {_build.TORCH_MISSING}"
    assert r.stderr.strip() == f"slim-kernels: error: {_build.TORCH_MISSING}"
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in _build.TORCH_MISSING


def test_too_old_torch_is_said(monkeypatch):
    import torch

    import slim_kernels

    monkeypatch.setattr(torch, "__version__", "2.3.1")
    with pytest.raises(ImportError, match=r"needs torch >= 2\.4, found torch 2\.3\.1"):
        slim_kernels._require_torch()


def test_info_says_why_each_missing_backend_is_missing():
    r = subprocess.run([sys.executable, "-m", "slim_kernels.cli", "info"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    available = lines[1].split("backends available here: ", 1)[1].split(", ")
    from slim_kernels.ops.backends import NAMES

    reasons = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip()
               for ln in lines if ln.startswith("  ")}
    assert set(reasons) == set(NAMES) - set(available), r.stdout
    assert all(reasons.values()), r.stdout
    import torch

    if "cuda" in reasons and torch.version.cuda is None:
        assert reasons["cuda"].startswith(f"torch {torch.__version__} is a CPU build"), r.stdout
    assert any(ln.startswith("slim_kernels._C: ") for ln in lines), r.stdout
