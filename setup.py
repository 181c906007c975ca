"""Build script: the slim_kernels package plus the optional C++/CUDA extension ``slim_kernels._C``.

The extension is built against the torch that is already installed, so build without build
isolation:

    pip install --no-build-isolation -e .          # or: python setup.py build_ext --inplace

* CPU kernels (csrc/cpu/*.cpp) are always built when torch is importable.
* CUDA kernels (csrc/cuda/*.cu + the host binding csrc/cuda/*.cpp) are built when torch is a
  CUDA build. ``SLIM_KERNELS_BUILD_CUDA=0`` turns them off; ``SLIM_KERNELS_BUILD_CUDA=1``
  demands them and fails with a clear error when that is impossible. No GPU is needed (a
  cluster's build node): ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures, default
  ``8.0;8.6;8.9;9.0+PTX`` (A100, A10/A40, L4/L40/4090, H100/H200 + PTX for newer GPUs);
  the toolkit is ``CUDA_HOME`` / ``CUDA_PATH`` when set, else the one the ``nvcc`` on PATH
  belongs to (asked from nvcc itself, since ``/usr/local/bin/nvcc`` may be a wrapper); the
  toolkit's own headers come before the pip ``nvidia/*/include`` folders.
* ``SLIM_KERNELS_BUILD_EXT=0`` skips the extension altogether (pure-Python install; the
  package then runs on its ``torch`` backend).

Without torch at build time the package is installed pure-Python, with a message saying so.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


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


def _ninja_on_path():
    """Put the ninja that pip installed beside this interpreter (``pip install ninja``) first on
    PATH. torch's BuildExtension runs ``ninja`` from PATH, and a venv's pip run without
    activating the venv (``VENV/bin/pip install --no-build-isolation .``) has the venv's bin off
    PATH: the build would fall back to the slow one-file-at-a-time distutils backend, or use
    some other ninja."""
    import shutil
    import sysconfig

    scripts = sysconfig.get_path("scripts")
    if not scripts or not shutil.which("ninja", path=scripts):
        return
    path = os.environ.get("PATH", "")
    if os.path.normcase(scripts) not in (os.path.normcase(p) for p in path.split(os.pathsep)):
        os.environ["PATH"] = scripts + (os.pathsep + path if path else "")


def _extensions():
    if _flag("SLIM_KERNELS_BUILD_EXT") is False:
        print("slim_kernels: SLIM_KERNELS_BUILD_EXT=0, building the pure-Python package only")
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
            "slim_kernels: torch is not importable at build time, so the C++ extension "
            "slim_kernels._C is NOT built (the package runs on its 'torch' backend). To build "
            "it: install torch, then `pip install --no-build-isolation .`",
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

    # no -std flag: torch picks the standard its headers need (C++20 for torch >= 2.10)
    cxx = ["-O3", "-g0", "-fopenmp-simd"]
    if sys.platform == "win32":
        cxx = ["/O2"]
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
    _ninja_on_path()
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def main():
    ext_modules, cmdclass = _extensions()
    setup(
        packages=find_packages(include=["slim_kernels", "slim_kernels.*"]),
        # the demo's embedded base model (config.json, model.safetensors, pretrain_metrics.json)
        package_data={"slim_kernels.demo": ["base_model/*.json", "base_model/*.safetensors"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import it
    main()
