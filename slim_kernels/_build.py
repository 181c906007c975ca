"""How the C++ extension ``slim_kernels._C`` is built, in one place for both ways it is built:

* at install time, by ``setup.py`` (``pip install --no-build-isolation .``, torch importable);
* on first use, by :func:`compile_on_first_use`, when the installed package has no ``_C`` that
  loads (a plain ``pip install .``: under build isolation torch is not importable, so nothing
  could be compiled; or a ``_C`` built for another torch). The csrc sources travel inside the
  package (``slim_kernels/_csrc``, copied there by setup.py) for this. The library is compiled
  with torch's own JIT machinery (``torch.utils.cpp_extension.load``, ninja) into a cache
  directory keyed by everything the binary depends on: torch version, build and C++ ABI,
  Python, platform, compiler and its version, flags and the sources' content. A second process
  loads it from there at once; a changed torch, compiler or source compiles anew.

This module imports no torch at import time (setup.py loads it by its path, before torch is
known to be importable), and nothing else of the package.

Environment: ``SLIM_KERNELS_JIT=0`` turns the compile on first use off (CI sets it, so that
only the extension built at install time counts); ``SLIM_KERNELS_CACHE`` is the cache root
(default ``$XDG_CACHE_HOME/slim_kernels``, else ``~/.cache/slim_kernels``); ``CXX`` is the
compiler, as for torch (default ``c++``); ``MAX_JOBS`` the parallel compile jobs.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

NAME = "slim_kernels_C"  # the library's file name; its ops are torch.ops.slim_kernels_C.*
# Compile flags of the CPU kernels (setup.py and the compile on first use). No -std flag:
# torch picks the standard its headers need (C++20 for torch >= 2.10).
CXX_FLAGS = ["/O2"] if sys.platform == "win32" else ["-O3", "-g0", "-fopenmp-simd"]
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
TORCH_MIN = (2, 4)
TORCH_MISSING = (
    f"slim_kernels needs PyTorch (torch >= {'.'.join(map(str, TORCH_MIN))}), which is not "
    "installed here. It is not a "
    "dependency of the package, so that pip never picks a multi-GB build for you: install the "
    "torch you want first, then slim_kernels. CPU: `pip install torch "
    "--index-url https://download.pytorch.org/whl/cpu`; a GPU: the command for your CUDA "
    "version from https://pytorch.org/get-started/locally/"
)

PKG = Path(__file__).resolve().parent


class Unavailable(Exception):
    """Why the extension cannot be had here; str() is the message for the user."""


def jit_enabled() -> bool:
    return os.environ.get("SLIM_KERNELS_JIT", "").strip().lower() not in ("0", "false", "no", "off")


def source_dir() -> Optional[Path]:
    """The csrc tree: ``slim_kernels/_csrc`` in an installed package, ``csrc/`` beside the
    package in a checkout (an editable install, or PYTHONPATH). None when neither exists."""
    for d in (PKG / "_csrc", PKG.parent / "csrc"):
        if any((d / "cpu").glob("*.cpp")):
            return d
    return None


def source_files(root: Path) -> List[Path]:
    """Every source and header under ``root``, sorted (what is copied and hashed)."""
    return sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())


def cpu_sources(root: Path) -> List[Path]:
    return sorted((root / "cpu").glob("*.cpp"))


def find_compiler(environ: Mapping[str, str] = os.environ) -> Tuple[List[str], str]:
    """The C++ compiler torch's build would use (``CXX``, else ``c++``) as an argv, and the
    first line of its ``--version``. Raises :class:`Unavailable` saying what is missing."""
    cxx = environ.get("CXX", "").strip() or ("cl" if sys.platform == "win32" else "c++")
    argv = shlex.split(cxx)
    where = "CXX=" + cxx if environ.get("CXX", "").strip() else f"`{cxx}`"
    path = shutil.which(argv[0], path=environ.get("PATH"))
    if not path:
        raise Unavailable(
            f"no C++ compiler: {where} is not on PATH. Install one (Debian/Ubuntu: "
            f"`apt install g++`; Fedora: `dnf install gcc-c++`; macOS: `xcode-select --install`) "
            f"or set CXX to it")
    argv[0] = path
    if sys.platform == "win32":
        return argv, path
    try:
        r = subprocess.run(argv + ["--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise Unavailable(f"the C++ compiler {where} does not run ({e})") from e
    if r.returncode != 0:
        raise Unavailable(f"the C++ compiler {where} does not run (`{cxx} --version` exited "
                          f"{r.returncode}). Install g++ or set CXX to a working compiler")
    return argv, (r.stdout.strip().splitlines() or [path])[0]


def first_error_line(log: str) -> str:
    """The compiler's first error (``file:line:col: error: ...``) in a build log, else the
    ninja ``FAILED:`` line, else the log's last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for pat in (r"\b(fatal )?error\b[:\s]", r"^FAILED:"):
        for ln in lines:
            if re.search(pat, ln, re.IGNORECASE) and not ln.startswith("Error building extension"):
                return ln
    return lines[-1] if lines else "(no output)"


def cache_root() -> Path:
    if os.environ.get("SLIM_KERNELS_CACHE"):
        return Path(os.environ["SLIM_KERNELS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slim_kernels"


def cache_key(torch_info: Mapping[str, str], compiler: str, sources: Dict[str, bytes]) -> str:
    """A directory name that changes whenever the binary could: ``torch_info`` (version, CUDA
    version, C++ ABI, git hash), the Python ABI and platform, the compiler and its version, the
    flags and every source's path and content. Readable prefix, then a hash."""
    h = hashlib.sha256()
    parts = [f"{k}={v}" for k, v in sorted(torch_info.items())]
    parts += [sys.implementation.cache_tag or "", sysconfig.get_platform(), compiler,
              " ".join(CXX_FLAGS)]
    for p in parts:
        h.update(p.encode() + b"\0")
    for rel, data in sorted(sources.items()):
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", torch_info.get("version", "torch"))
    return f"torch{tag}-{sys.implementation.cache_tag}-{h.hexdigest()[:16]}"


def _torch_info(torch) -> Dict[str, str]:
    return {"version": str(torch.__version__), "cuda": str(torch.version.cuda),
            "git": str(getattr(torch.version, "git_version", "")),
            "cxx11_abi": str(torch._C._GLIBCXX_USE_CXX11_ABI)}


def _say(msg: str) -> None:
    print(f"slim_kernels: {msg}", file=sys.stderr, flush=True)


class _Heartbeat:
    """Prints "still compiling" every ``every`` seconds until stopped: a compile can take
    minutes on a busy machine, and silence looks like a hang."""

    def __init__(self, every: float = 20.0):
        self.every, self.t0, self._stop = every, time.monotonic(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            _say(f"... still compiling ({time.monotonic() - self.t0:.0f} s)")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class _Lock:
    """An exclusive lock on a file, released by the kernel if the process dies (so a killed
    compile never blocks later ones); no-op where fcntl is missing (Windows)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process compiling the C++ extension ({self.path})")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock


def ninja_on_path() -> str:
    """Put the ninja that pip installed beside this interpreter first on PATH, and return
    PATH as it was. torch's builders run ``ninja`` from PATH, and a venv's bin folder is off
    PATH when the venv is not activated (``VENV/bin/pip install ...``): the build would then
    fall back to a slow one-file-at-a-time build, use some other ninja, or (JIT) fail."""
    path = os.environ.get("PATH", "")
    scripts = sysconfig.get_path("scripts")
    if scripts and shutil.which("ninja", path=scripts) and os.path.normcase(scripts) not in (
            os.path.normcase(p) for p in path.split(os.pathsep)):
        os.environ["PATH"] = scripts + (os.pathsep + path if path else "")
    return path


def _library(directory: Path) -> Optional[Path]:
    libs = sorted(directory.glob(NAME + "*.so")) + sorted(directory.glob(NAME + "*.pyd"))
    return libs[0] if libs else None


def compile_on_first_use(why_not_built: str) -> Path:
    """Load a ``slim_kernels_C`` library for the running torch (``torch.ops.load_library``),
    from the cache, or compiled now with messages on stderr while it compiles; return its path.
    ``why_not_built`` says why the install-time one is not used, for the messages. Raises
    :class:`Unavailable` with the reason and the fix."""
    if not jit_enabled():
        raise Unavailable(
            f"{why_not_built}, and compiling it on first use is off (SLIM_KERNELS_JIT=0). "
            f"Unset SLIM_KERNELS_JIT, or build it at install: pip install setuptools wheel "
            f"ninja, then pip install --no-build-isolation slim-kernels (or . in a checkout)")
    src = source_dir()
    if src is None:
        raise Unavailable(f"{why_not_built}, and the package has no C++ sources to compile "
                          f"(neither {PKG / '_csrc'} nor {PKG.parent / 'csrc'} exists): "
                          f"reinstall it from a wheel or sdist built by its setup.py")
    try:
        compiler_argv, compiler_version = find_compiler()
    except Unavailable as e:
        raise Unavailable(f"{why_not_built}, and it cannot be compiled here: {e}") from None
    import torch

    sources = {p.relative_to(src).as_posix(): p.read_bytes() for p in source_files(src)}
    compiler = f"{' '.join(compiler_argv)} ({compiler_version})"
    root = cache_root() / "ext"
    key = cache_key(_torch_info(torch), compiler, sources)
    final, failed = root / key, root / (key + ".failed.log")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Unavailable(f"{why_not_built}, and its cache directory {root} cannot be created "
                          f"({e}); set SLIM_KERNELS_CACHE to a writable directory") from e
    with _Lock(root / (key + ".lock")):
        lib = _library(final)
        if lib is not None:
            torch.ops.load_library(str(lib))
            return lib
        if failed.exists():
            raise Unavailable(_failed(why_not_built, failed.read_text(errors="replace"), failed))
        return _compile(src, final, compiler, failed, why_not_built)


def _failed(why_not_built: str, log: str, log_file: Path) -> str:
    return (f"{why_not_built}, and compiling it failed: {first_error_line(log)} (full log: "
            f"{log_file}; delete that file to try again)")


def _compile(src: Path, final: Path, compiler: str, failed: Path, why_not_built: str) -> Path:
    """Compile into a temporary folder with torch's JIT builder (which also loads the library),
    then move the folder into the cache under its key."""
    import torch
    from torch.utils import cpp_extension

    path = ninja_on_path()
    try:
        if not cpp_extension.is_ninja_available():
            raise Unavailable(f"{why_not_built}, and compiling it needs ninja, which is not "
                              f"installed here: pip install ninja")
        _say(f"{why_not_built}; compiling it now for torch {torch.__version__} with {compiler}, "
             f"once per torch and compiler (about 15-60 s; minutes on a busy machine), into "
             f"{final}")
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        t0 = time.monotonic()
        try:
            with _Heartbeat():
                built = cpp_extension.load(
                    name=NAME, sources=[str(p) for p in cpu_sources(src)],
                    extra_cflags=CXX_FLAGS, extra_include_paths=[str(src)],
                    build_directory=str(tmp), is_python_module=False, verbose=False)
        except Exception as e:  # torch's RuntimeError carries the compiler's output
            shutil.rmtree(tmp, ignore_errors=True)
            failed.write_text(f"compiler: {compiler}\n{e}\n")
            _say(f"compiling slim_kernels._C failed: {first_error_line(str(e))}")
            raise Unavailable(_failed(why_not_built, str(e), failed)) from e
    finally:
        os.environ["PATH"] = path  # as it was
        if not path:
            del os.environ["PATH"]
    for f in tmp.iterdir():  # objects, ninja files: only the library is kept
        if f.name != Path(built).name and f.is_file():
            f.unlink()
    # the folder appears complete or not at all; a killed compile leaves only its .tmp-PID
    # folder behind. The library stays loaded across the rename (same file).
    shutil.rmtree(final, ignore_errors=True)  # a folder without a library: a leftover
    os.replace(tmp, final)
    _say(f"compiled slim_kernels._C in {time.monotonic() - t0:.0f} s; later runs load it from "
         f"the cache")
    return final / Path(built).name
