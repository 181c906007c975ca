"""Build script. Pure-Python package for now; the C++/CUDA extension is added in csrc/."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["slim_kernels", "slim_kernels.*"]))
