"""Build script. Pure-Python package for now; the C++/CUDA extension is added in csrc/."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["slim_kernels", "slim_kernels.*"]),
    # the demo's embedded base model (config.json, model.safetensors, pretrain_metrics.json)
    package_data={"slim_kernels.demo": ["base_model/*.json", "base_model/*.safetensors"]},
)
