"""`x @ w.T` in bf16 with f32 accumulation through oneDNN, for GPT-2's `matmul: onednn`.

Why: on a CPU with AVX-512 BF16 (no AMX), XLA:CPU's bf16 dot is no faster than its f32 dot,
while oneDNN's brgemm kernels (what torch's bf16 autocast runs) are ~2x faster
(README, "What the numbers say"). The product is an XLA FFI call (`models/onednn_matmul.cc`,
built by `pip install -e .` against the `onednn-cpu-gomp` wheel) with a custom VJP whose two
backward products are oneDNN calls too, each reading its transposed operand through strides.

CPU only. Under `jit` on a mesh of several devices XLA treats the call as opaque and runs it
replicated (operands gathered to every device): correct, but it gives up data parallelism,
so use it on a single CPU device (the benchmarks, a workstation), not on a sharded run.
"""

from __future__ import annotations

import ctypes
import math
from importlib import metadata
from types import ModuleType

import jax
import jax.numpy as jnp

TARGET = "jaxrl_onednn_matmul_bf16"

_module: ModuleType | None = None
_load_error: str | None = None


def _load_library():
    """libdnnl.so.3 from the onednn-cpu-gomp wheel, loaded globally so the extension's link to
    it resolves (the wheel installs it under the environment's lib/, off the loader's path)."""
    files = metadata.distribution("onednn-cpu-gomp").files or []
    path = next((f for f in files if f.name == "libdnnl.so.3"), None)
    if path is None:
        raise ImportError("the onednn-cpu-gomp wheel lists no libdnnl.so.3")
    ctypes.CDLL(str(path.locate()), mode=ctypes.RTLD_GLOBAL)


def load() -> ModuleType | None:
    """Import the extension and register its FFI target once; None (with a reason) if missing."""
    global _module, _load_error
    if _module is None and _load_error is None:
        try:
            _load_library()
            from jaxrl.models import _onednn
        except (ImportError, OSError, metadata.PackageNotFoundError) as e:
            _load_error = (f"oneDNN's bf16 matmul is not available ({e}); it needs x86-64 Linux, "
                           "the onednn-cpu-gomp wheel and the extension `pip install -e .` builds "
                           "next to it; or set matmul: xla")
            return None
        try:  # oneDNN has bf16 matmuls from AVX-512 up (emulated, slow, without AVX-512 BF16)
            _onednn.implementation(8, 8, 8)
        except RuntimeError as e:
            _load_error = (f"oneDNN {_onednn.version()} has no bf16 matmul for this CPU ({e}); "
                           "it needs AVX-512, and AVX-512 BF16 or AMX to be fast: set matmul: xla")
            return None
        for name, capsule in _onednn.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        _module = _onednn
    return _module


def unavailable() -> str | None:
    """Why the extension cannot run here (and what to do), or None when it can."""
    return None if load() is not None else _load_error


def require() -> ModuleType:
    module = load()
    if module is None:
        raise RuntimeError(_load_error)
    return module


def implementation(m: int, n: int, k: int) -> str:
    """The kernel oneDNN runs for an [m, k] x [k, n] bf16 product on this CPU."""
    return require().implementation(m, n, k)


def _product(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
    """f32 [M, N] = A @ B for bf16 A ([M, K], or [K, M] when trans_a) and B ([K, N] / [N, K])."""
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
        a, b, trans_a=trans_a, trans_b=trans_b)


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return _product(x, w, False, True)  # [M, K] x [N, K]^T


def _matmul_fwd(x, w):
    return _matmul(x, w), (x, w)


def _matmul_bwd(residuals, g):
    x, w = residuals
    g = g.astype(jnp.bfloat16)  # as autocast: cotangents enter the products in bf16
    dx = _product(g, w, False, False)  # [M, N] x [N, K]
    dw = _product(g, x, True, False)  # [M, N]^T x [M, K]
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul_bf16(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32 `x @ w.T` for x [..., K] and w [N, K] (torch's layout), both rounded to bf16."""
    require()
    if (backend := jax.default_backend()) != "cpu":  # the FFI target exists for the CPU only
        raise ValueError(f"matmul: onednn runs on the CPU backend only, and this process's "
                         f"default backend is {backend}: set matmul: xla")
    *lead, k = x.shape
    if w.ndim != 2 or w.shape[1] != k:
        raise ValueError(f"matmul_bf16: w must be [N, {k}] for x [..., {k}], got {w.shape}")
    rows = math.prod(lead)
    if rows == 0:
        return jnp.zeros((*lead, w.shape[0]), jnp.float32)
    y = _matmul(x.reshape(rows, k).astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    return y.reshape(*lead, w.shape[0])
