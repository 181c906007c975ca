"""Build script: the slim_kernels package plus the optional C++/CUDA extension ``slim_kernels._C``.

The extension is built against the torch that is already installed, so build without build
isolation:

    pip install --no-build-isolation -e .          # or: python setup.py build_ext --inplace

* CPU kernels (csrc/cpu/*.cpp) are always built when torch is importable.
* CUDA kernels (csrc/cuda/*.cu + the host binding csrc/cuda/*.cpp) are built when torch is a
  CUDA build. ``SLIM_KERNELS_BUILD_CUDA=0`` turns them off; ``SLIM_KERNELS_BUILD_CUDA=1``
  demands them and fails with a clear error when that is impossible. ``TORCH_CUDA_ARCH_LIST``
  picks the GPU architectures (torch's own default otherwise).
* ``SLIM_KERNELS_BUILD_EXT=0`` skips the extension altogether (pure-Python install; the
  package then runs on its ``torch`` backend).

Without torch at build time the package is installed pure-Python, with a message saying so.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    """None when unset/empty, else True/False."""
    v = os.environ.get(name, "").strip().lower()
    if v == "":
        return None
    return v not in ("0", "false", "no", "off")


def _nvidia_include_dirs():
    """site-packages/nvidia/*/include of the CUDA torch wheels (cusparse.h and friends)."""
    dirs = []
    for p in sys.path:
        dirs.extend(sorted(glob.glob(os.path.join(p, "nvidia", "*", "include"))))
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


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
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            name="slim_kernels._C",
            sources=cpu_sources + cuda_sources,
            include_dirs=include_dirs + _nvidia_include_dirs(),
            define_macros=[("SLIM_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx + ["-DSLIM_KERNELS_WITH_CUDA=1"], "nvcc": nvcc},
        )
        print("slim_kernels: building slim_kernels._C with CPU and CUDA kernels")
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


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["slim_kernels", "slim_kernels.*"]),
    # the demo's embedded base model (config.json, model.safetensors, pretrain_metrics.json)
    package_data={"slim_kernels.demo": ["base_model/*.json", "base_model/*.safetensors"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
