"""Builds the Prospector C++ core (an XLA FFI handler library) at `pip install`, and ships configs/.

Everything else about the package lives in pyproject.toml. The XLA FFI headers come from the
installed jax (`jax.ffi.include_dir()`), which pyproject's build requirements provide.

configs/ stays at the repository root (so `configs/x.yaml` works from a checkout) and is
installed as `jaxrl/configs/`, so `python -m jaxrl.launch NAME` works from any directory
after a plain `pip install .`.
"""

import jax
from setuptools import Extension, find_namespace_packages, setup

prospector_core = Extension(
    "jaxrl.envs.prospector._native",
    sources=["jaxrl/envs/prospector/prospector.cc"],
    include_dirs=[jax.ffi.include_dir()],
    language="c++",
    # -ffp-contract=off: no fused multiply-adds, so floats round exactly like the JAX core.
    extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=off", "-fvisibility=hidden"],
)

setup(
    ext_modules=[prospector_core],
    packages=[*find_namespace_packages(include=["jaxrl*"]), "jaxrl.configs"],
    package_dir={"jaxrl.configs": "configs"},
)
