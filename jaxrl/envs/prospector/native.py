"""JAX binding of the C++ core: `reset_many` / `step_many` as XLA FFI custom calls.

The calls are pure (state buffers in, new state buffers out, aliased in place when XLA can),
treat every leading dim as a batch dim (so `vmap_method="broadcast_all"` turns a vmapped
single-env call into ONE batched call), and run on the CPU platform only. Inside `jax.shard_map`
each device calls the core on its local shard; nothing is gathered.

The compiled module is `jaxrl.envs.prospector._native`, built by `pip install -e .`. Set
`JAXRL_PROSPECTOR_NATIVE=/path/to/_native*.so` to load another build (the sanitizer test does).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.envs.prospector import spec as S
from jaxrl.envs.prospector.jax_env import ProspectorState

_module: ModuleType | None = None
_load_error: str | None = None

STATE_WIDTHS = {
    "ship": S.SHIP_WORDS,
    "asteroids": S.N_SECTORS * S.N_ASTEROIDS,
    "sectors": S.N_SECTORS,
    "market": S.MARKET_WORDS,
}


def _import_module() -> ModuleType:
    path = os.environ.get("JAXRL_PROSPECTOR_NATIVE")
    if not path:
        from jaxrl.envs.prospector import _native

        return _native
    loader = importlib.machinery.ExtensionFileLoader("_native", path)
    module_spec = importlib.util.spec_from_file_location("_native", path, loader=loader)
    module = importlib.util.module_from_spec(module_spec)
    loader.exec_module(module)
    return module


def load() -> ModuleType | None:
    """Import the compiled core and register its FFI targets once; None if it is missing."""
    global _module, _load_error
    if _module is None and _load_error is None:
        try:
            module = _import_module()
            for name, capsule in module.registrations().items():
                jax.ffi.register_ffi_target(name, capsule, platform="cpu")
            _module = module
        except ImportError as e:
            _load_error = (f"the Prospector C++ core is not built ({e}); run `pip install -e .` "
                           "from the repository root, or use env_impl='jax'")
    return _module


def available() -> bool:
    return load() is not None


def require() -> ModuleType:
    module = load()
    if module is None:
        raise RuntimeError(_load_error)
    return module


def constants() -> dict:
    """The rule constants compiled into the C++ core (tests compare them with spec.py)."""
    return require().constants()


def _attrs(max_steps: int, **extra: int) -> dict:
    return {"max_steps": np.int32(max_steps), **{k: np.int32(v) for k, v in extra.items()}}


def reset_many(seeds: jax.Array, max_steps: int) -> tuple[ProspectorState, jax.Array]:
    """seeds uint32[*B] -> (state with leading dims B, obs float32[*B, 260])."""
    require()
    seeds = jnp.asarray(seeds)
    if seeds.dtype != jnp.uint32:
        raise TypeError(f"prospector reset_many: seeds must be uint32, got {seeds.dtype}")
    batch = seeds.shape
    out_types = [jax.ShapeDtypeStruct(batch + (w,), jnp.int32) for w in STATE_WIDTHS.values()]
    out_types.append(jax.ShapeDtypeStruct(batch + (S.OBS_DIM,), jnp.float32))
    call = jax.ffi.ffi_call("prospector_reset_many", out_types, vmap_method="broadcast_all")
    ship, asteroids, sectors, market, obs = call(seeds, **_attrs(max_steps))
    return ProspectorState(ship=ship, asteroids=asteroids, sectors=sectors, market=market), obs


def _check_state(state: ProspectorState, batch: tuple[int, ...]) -> None:
    for name, width in STATE_WIDTHS.items():
        leaf = getattr(state, name)
        if leaf.dtype != jnp.int32 or leaf.shape != batch + (width,):
            raise ValueError(
                f"prospector step_many: state.{name} must be int32{list(batch + (width,))} to "
                f"match actions of shape {list(batch)}, got {leaf.dtype}{list(leaf.shape)}"
            )


def step_many(state: ProspectorState, actions: jax.Array, *, max_steps: int,
              invalid_penalty: int, loss_penalty: int):
    """One auto-resetting step of every env.

    actions int[*B] (out-of-range values are the documented invalid no-op with a penalty).
    Returns (state, obs, reward f32[*B], terminated bool[*B], truncated bool[*B],
    final_obs f32[*B, 260]).
    """
    require()
    actions = jnp.asarray(actions)
    if not jnp.issubdtype(actions.dtype, jnp.integer):
        raise TypeError(
            f"prospector step_many: actions must be integer indices in [0, {S.N_ACTIONS}), got "
            f"{actions.dtype}; cast with .astype(jnp.int32) (floats, and NaN, are not actions)"
        )
    actions = actions.astype(jnp.int32)
    batch = actions.shape
    _check_state(state, batch)
    f32 = lambda *shape: jax.ShapeDtypeStruct(batch + shape, jnp.float32)  # noqa: E731
    out_types = [jax.ShapeDtypeStruct(batch + (w,), jnp.int32) for w in STATE_WIDTHS.values()]
    out_types += [f32(S.OBS_DIM), f32(), jax.ShapeDtypeStruct(batch, jnp.bool_),
                  jax.ShapeDtypeStruct(batch, jnp.bool_), f32(S.OBS_DIM)]
    call = jax.ffi.ffi_call("prospector_step_many", out_types, vmap_method="broadcast_all",
                            input_output_aliases={0: 0, 1: 1, 2: 2, 3: 3})
    ship, asteroids, sectors, market, obs, reward, terminated, truncated, final_obs = call(
        state.ship, state.asteroids, state.sectors, state.market, actions,
        **_attrs(max_steps, invalid_penalty=invalid_penalty, loss_penalty=loss_penalty),
    )
    new_state = ProspectorState(ship=ship, asteroids=asteroids, sectors=sectors, market=market)
    # The core writes final_obs only where an episode ended (elsewhere it is the next obs and
    # the buffer is left unwritten); the select is fused into its consumer, or dropped with it.
    final_obs = jnp.where((terminated | truncated)[..., None], final_obs, obs)
    return new_state, obs, reward, terminated, truncated, final_obs
