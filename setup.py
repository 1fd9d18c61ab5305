"""Builds the two C++ extensions (XLA FFI handler libraries) at `pip install`, and ships configs/.

- `jaxrl.envs.prospector._native`: the Prospector core.
- `jaxrl.models._onednn`: oneDNN's bf16 matmul for GPT-2's `matmul: onednn` (x86-64 Linux only,
  where the `onednn-devel-cpu-gomp` build requirement has wheels; optional: a failed build only
  leaves the option unavailable, with a message saying so).

Everything else about the package lives in pyproject.toml. The XLA FFI headers come from the
installed jax (`jax.ffi.include_dir()`), which pyproject's build requirements provide.

configs/ stays at the repository root (so `configs/x.yaml` works from a checkout) and is
installed as `jaxrl/configs/`, so `python -m jaxrl.launch NAME` works from any directory
after a plain `pip install .`.
"""

import sys
from importlib import metadata
from pathlib import Path

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


def onednn_extension() -> list[Extension]:
    """The oneDNN matmul extension, against the oneDNN wheel's headers and library (pip puts
    their data files under the build environment's prefix); none where the wheel is absent."""
    try:
        files = metadata.distribution("onednn-devel-cpu-gomp").files or []
        lib_files = metadata.distribution("onednn-cpu-gomp").files or []
    except metadata.PackageNotFoundError:
        return []
    header = next((f for f in files if f.name == "dnnl.hpp" and f.parent.name == "dnnl"), None)
    library = next((f for f in lib_files if f.name == "libdnnl.so"), None)
    if header is None or library is None:
        return []
    include = Path(header.locate()).resolve().parents[2]  # .../include/oneapi/dnnl/dnnl.hpp
    return [Extension(
        "jaxrl.models._onednn",
        sources=["jaxrl/models/onednn_matmul.cc"],
        include_dirs=[jax.ffi.include_dir(), str(include)],
        library_dirs=[str(Path(library.locate()).resolve().parent)],
        libraries=["dnnl"],
        # Where the onednn-cpu-gomp wheel puts libdnnl.so.3 at run time: the environment's lib/
        # (an editable install, built by this prefix's Python) or four levels above a
        # site-packages jaxrl/models/; models/onednn.py also preloads it from the wheel's record.
        runtime_library_dirs=[str(Path(sys.prefix) / "lib")],
        extra_link_args=["-Wl,-rpath,$ORIGIN/../../../.."],
        language="c++",
        extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden"],
        optional=True,
    )]


setup(
    ext_modules=[prospector_core, *onednn_extension()],
    packages=[*find_namespace_packages(include=["jaxrl*"]), "jaxrl.configs"],
    package_dir={"jaxrl.configs": "configs"},
)
