"""Builds the Prospector C++ core (an XLA FFI handler library) at `pip install`.

Everything else about the package lives in pyproject.toml. The XLA FFI headers come from the
installed jax (`jax.ffi.include_dir()`), which pyproject's build requirements provide.
"""

import jax
from setuptools import Extension, setup

prospector_core = Extension(
    "jaxrl.envs.prospector._native",
    sources=["jaxrl/envs/prospector/prospector.cc"],
    include_dirs=[jax.ffi.include_dir()],
    language="c++",
    # -ffp-contract=off: no fused multiply-adds, so floats round exactly like the JAX core.
    extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=off", "-fvisibility=hidden"],
)

setup(ext_modules=[prospector_core])
