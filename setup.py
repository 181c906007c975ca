"""Build script: the slim_kernels package plus the C++/CUDA extension ``slim_kernels._C``.

The extension is built against the torch that is already installed. Two ways to install:

    pip install --no-build-isolation .     # torch importable: _C is built now (or -e .)
    pip install .                          # build isolation: torch is not importable here,
                                           # so _C is compiled on first use, into a cache

Either way the csrc sources travel inside the package (``slim_kernels/_csrc``), so an install
without a working ``_C`` compiles it on first use (``slim_kernels/_build.py``). A C++ compiler
is therefore required: without one the install stops and says how to get one, or how to
install without the C++ backend (``SLIM_KERNELS_BUILD_EXT=0``).

* CPU kernels (csrc/cpu/*.cpp) are always built when torch is importable.
* CUDA kernels (csrc/cuda/*.cu + the host binding csrc/cuda/*.cpp) are built when torch is a
  CUDA build (at install time only). ``SLIM_KERNELS_BUILD_CUDA=0`` turns them off;
  ``SLIM_KERNELS_BUILD_CUDA=1`` demands them and fails with a clear error when that is
  impossible. No GPU is needed (a cluster's build node): ``TORCH_CUDA_ARCH_LIST`` picks the
  GPU architectures, default ``8.0;8.6;8.9;9.0+PTX`` (A100, A10/A40, L4/L40/4090, H100/H200 +
  PTX for newer GPUs); the toolkit is ``CUDA_HOME`` / ``CUDA_PATH`` when set, else the one the
  ``nvcc`` on PATH belongs to (asked from nvcc itself, since ``/usr/local/bin/nvcc`` may be a
  wrapper); the toolkit's own headers come before the pip ``nvidia/*/include`` folders.
* ``SLIM_KERNELS_BUILD_EXT=0`` builds no extension at install time and needs no compiler (the
  package then compiles the CPU kernels on first use if it finds a compiler, else runs on its
  ``torch`` backend; ``SLIM_KERNELS_JIT=0`` turns that off).
"""
import glob
import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    """slim_kernels/_build.py by its path (the flags and compiler checks the compile on first
    use shares): importing the package would import torch."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "slim_kernels_build", os.path.join(HERE, "slim_kernels", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_build = _load_build_module()


# the one line of slim_kernels_peft.pth: run at every interpreter start of the environment,
# it registers SLIM with PEFT when peft is imported (_slim_kernels_peft.py says why and how)
PTH_NAME = "slim_kernels_peft.pth"
PTH_LINE = "import _slim_kernels_peft; _slim_kernels_peft.install()\n"


class BuildPyWithSources(build_py):
    """build_py (it runs for every wheel and install, not for an sdist) that first checks for
    a C++ compiler, then also copies csrc/ into the package as ``slim_kernels/_csrc``: the
    sources an install compiles ``_C`` from on first use (an editable install uses the
    checkout's csrc/ directly), and writes ``slim_kernels_peft.pth`` to the root of what is
    installed (site-packages)."""

    def run(self):
        if _flag("SLIM_KERNELS_BUILD_EXT") is not False:
            try:
                _build.find_compiler()
            except _build.Unavailable as e:
                # without one the package would be pure Python (the slow 'torch' backend on
                # CPU) while pip reports success
                raise SystemExit(
                    f"slim_kernels: cannot install: {e}.\n"
                    "slim_kernels compiles its C++ extension (the fast CPU backend 'cpp') with "
                    "it, at install time or on first use. To install without it (CPU ops then "
                    "run on the slower 'torch' backend; GPUs still get triton), run the same "
                    "pip command with SLIM_KERNELS_BUILD_EXT=0 set, e.g. "
                    "SLIM_KERNELS_BUILD_EXT=0 pip install .") from None
        super().run()
        if getattr(self, "editable_mode", False):
            # an editable wheel packs what its install command puts into the unpacked wheel
            root = getattr(self.distribution.get_command_obj("install"), "install_lib", None)
            if root and os.path.isdir(root):
                with open(os.path.join(root, PTH_NAME), "w") as f:
                    f.write(PTH_LINE)
            return
        with open(os.path.join(self.build_lib, PTH_NAME), "w") as f:
            f.write(PTH_LINE)
        src = os.path.join(HERE, "csrc")
        for f in _build.source_files(pathlib.Path(src)):
            dst = os.path.join(self.build_lib, "slim_kernels", "_csrc", os.path.relpath(f, src))
            self.mkpath(os.path.dirname(dst))
            self.copy_file(str(f), dst)


def _flag(name):
    """None when unset/empty, else True/False."""
    v = os.environ.get(name, "").strip().lower()
    if v == "":
        return None
    return v not in ("0", "false", "no", "off")


DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def cuda_arch_list(environ=os.environ):
    """TORCH_CUDA_ARCH_LIST when set, else :data:`DEFAULT_CUDA_ARCHS`. torch would otherwise
    ask the visible GPU, and a build node without one fails (IndexError in
    ``_get_cuda_arch_flags``)."""
    return environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def _nvcc_top(nvcc, run=subprocess.run):
    """The toolkit root nvcc reports for itself (``TOP=`` of ``nvcc -dryrun``): right even
    when ``nvcc`` is a wrapper script outside the toolkit."""
    try:
        r = run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (r.stdout + r.stderr).splitlines():
        line = line.lstrip("#$ ").strip()
        if line.startswith("TOP="):
            return os.path.normpath(line[4:])
    return None


def find_cuda_home(environ=os.environ, which=shutil.which, run=subprocess.run):
    """The CUDA toolkit to build with: CUDA_HOME or CUDA_PATH when set; else the toolkit of the
    nvcc on PATH (its real path's parent, or what nvcc reports); else /usr/local/cuda.
    None when there is none. (torch guesses ``dirname(dirname(which nvcc))``, which is
    ``/usr/local`` for a ``/usr/local/bin/nvcc`` wrapper.)"""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            return environ[var]
    nvcc = which("nvcc", path=environ.get("PATH"))
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(root):
            return root
        top = _nvcc_top(nvcc, run)
        if top:
            return top
    return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None


def _nvidia_include_dirs(paths=None):
    """site-packages/nvidia/*/include of the CUDA torch wheels (cusparse.h and friends)."""
    dirs = []
    for p in sys.path if paths is None else paths:
        dirs.extend(sorted(glob.glob(os.path.join(p, "nvidia", "*", "include"))))
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def cuda_include_dirs(cuda_home, nvidia_dirs):
    """The toolkit's include folder, then the pip nvidia ones: a pip ``nvidia/cu13/include``
    first would hide the toolkit's ``crt/host_config.h`` (and mix header versions)."""
    own = [os.path.join(cuda_home, "include")] if cuda_home else []
    return own + [d for d in nvidia_dirs if os.path.normpath(d) not in map(os.path.normpath, own)]


def _extensions():
    if _flag("SLIM_KERNELS_BUILD_EXT") is False:
        print("slim_kernels: SLIM_KERNELS_BUILD_EXT=0: no extension is built now (the package "
              "compiles it on first use if it finds a compiler; SLIM_KERNELS_JIT=0 turns that off)")
        return [], {}
    want_cuda = _flag("SLIM_KERNELS_BUILD_CUDA")
    cuda_home = find_cuda_home()
    if cuda_home and want_cuda is not False:
        # before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import
        os.environ.setdefault("CUDA_HOME", cuda_home)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        if want_cuda:
            raise RuntimeError(
                "SLIM_KERNELS_BUILD_CUDA=1 but torch is not importable at build time "
                f"({e}); install a CUDA torch first and build with --no-build-isolation"
            ) from e
        print(
            "slim_kernels: torch is not importable at build time (build isolation, or no torch "
            "yet), so slim_kernels._C is compiled on first use, against the torch installed "
            "then. To build it now instead: install torch, setuptools, wheel and ninja, then "
            "`pip install --no-build-isolation .`",
            file=sys.stderr,
        )
        return [], {}

    rel = lambda p: os.path.relpath(p, HERE)  # noqa: E731  (setuptools wants relative paths)
    cpu_sources = sorted(rel(p) for p in glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(rel(p) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
    cuda_sources += sorted(rel(p) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))

    torch_has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda and not torch_has_cuda:
        why = ("torch is a CPU-only build (torch.version.cuda is None)"
               if torch.version.cuda is None else
               "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
        raise RuntimeError(f"SLIM_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
    build_cuda = torch_has_cuda and want_cuda is not False

    cxx = list(_build.CXX_FLAGS)
    include_dirs = [os.path.join(HERE, "csrc")]
    if build_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            name="slim_kernels._C",
            sources=cpu_sources + cuda_sources,
            include_dirs=include_dirs + cuda_include_dirs(cpp_extension.CUDA_HOME,
                                                          _nvidia_include_dirs()),
            define_macros=[("SLIM_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx + ["-DSLIM_KERNELS_WITH_CUDA=1"], "nvcc": nvcc},
        )
        print("slim_kernels: building slim_kernels._C with CPU and CUDA kernels for "
              f"{os.environ['TORCH_CUDA_ARCH_LIST']} (CUDA_HOME={cpp_extension.CUDA_HOME})")
    else:
        ext = cpp_extension.CppExtension(
            name="slim_kernels._C",
            sources=cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
        )
        print("slim_kernels: building slim_kernels._C with CPU kernels only"
              + ("" if torch_has_cuda else " (torch has no CUDA)"))
    _build.ninja_on_path()  # torch's BuildExtension runs `ninja` from PATH
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def main():
    ext_modules, cmdclass = _extensions()
    setup(
        packages=find_packages(include=["slim_kernels", "slim_kernels.*"]),
        py_modules=["_slim_kernels_peft"],
        # the demo's embedded base model (config.json, model.safetensors, pretrain_metrics.json)
        # and the triton backend's configuration files (one per GPU or architecture)
        package_data={"slim_kernels.demo": ["base_model/*.json", "base_model/*.safetensors"],
                      "slim_kernels.ops.backends.triton": ["configs/*.json"]},
        ext_modules=ext_modules,
        cmdclass={"build_py": BuildPyWithSources, **cmdclass},
    )


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import it
    main()
