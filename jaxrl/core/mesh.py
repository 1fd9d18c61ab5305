"""The device mesh, the logical-axis rules table, and moving data onto the mesh.

Models name their parameter axes logically ("embed", "mlp", ...); `RULES` maps each logical
name to mesh axes. The same code runs on one CPU, 8 fake CPU devices, several local
processes and a TPU pod: only the mesh shape changes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxrl.core.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axes (None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "seq": None,
}


def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Resolve -1 and check that the mesh tiles the devices exactly."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise ConfigError(f"mesh: fixed axes {sizes} (product {known}) do not divide the "
                              f"{device_count} devices; choose sizes whose product divides it.")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are "
                          f"{device_count} devices; set one axis to -1 to take the rest.")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(names, rules=None) -> P:
    """('embed', 'mlp') -> P('fsdp', 'tensor'); a mesh axis is used at most once per array."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name in names or ():
        axes = rules.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def _fits(spec: P, shape, mesh: Mesh) -> P:
    """Drop mesh axes that do not divide the dimension (e.g. a 50258-row vocab on 2 tensors)."""
    dims = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        dims.append(axes if names and dim % size == 0 else None)
    return P(*dims)


def state_shardings(state, mesh: Mesh, rules=None):
    """NamedShardings for an NNX state (or any pytree of Variables / arrays) from logical names."""

    def one(leaf):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
        spec = _fits(logical_to_spec(names, rules), np.shape(value), mesh)
        sharding = NamedSharding(mesh, spec)
        return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state, mesh: Mesh, rules=None):
    """Place a pytree on the mesh by its logical names (a jitted identity, so no host copy)."""
    shardings = state_shardings(state, mesh, rules)
    return jax.jit(lambda s: s, out_shardings=shardings)(state)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(RULES["batch"], *([None] * (ndim - 1))))


def check_batch_size(rows: int, mesh: Mesh, key: str):
    """A global batch is split over data*fsdp devices: say so before JAX does, less clearly."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise ConfigError(f"{key}={rows} must be divisible by mesh data*fsdp={shards}; change "
                          f"{key} or the mesh.")


def shard_batch(batch, mesh: Mesh):
    """Host-local numpy batch (this process's rows) -> global arrays split over data*fsdp."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), x),
        batch,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
    """A full copy on every device, so any process can read it (export, sampling, printing)."""
    return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
