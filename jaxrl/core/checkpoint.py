"""Orbax checkpoints: train state + each process's data iterator + loop metadata, atomically.

Orbax writes each step into a temporary directory that the primary process finalises (renames)
once every process has written its shards, so a crash (even SIGKILL) mid-save leaves the
previous checkpoint intact; leftover temporary directories are removed on the next start.
Paths are `etils.epath` paths: local, NFS or `gs://`. On several processes the directory must
be one that every process sees (`require_shared` checks it before the first save).

Restoring takes a template (the state, or its abstract `ShapeDtypeStruct` layout from
`core.step.sharded_init`): shapes, dtypes and *shardings* come from it, so a checkpoint written
on one mesh restores onto another, and restoring into an abstract template holds no second
copy of the state. The data iterator is saved with Grain's own handler, one file per process.
"""

from __future__ import annotations

import uuid

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxrl.core.config import ConfigError


class Checkpointer:
    def __init__(self, directory: str | epath.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = _absolute(epath.Path(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, *, data=None, meta: dict | None = None):
        """Start saving (async); returns at once. Call `wait()` before exiting.

        `data`: a Grain iterator; each process writes its own position.
        """
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {}))
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, state_template, step: int | None = None, *, data=None):
        """-> (state, data, meta) of `step` (default: newest), laid out like `state_template`.

        `data`: the Grain iterator to move to the saved position (restored in place and
        returned; None when not given or the checkpoint holds no data position).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(_abstract, state_template)
        items = dict(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        if data is not None and (self.directory / str(step) / "data").exists():
            items["data"] = grain.checkpoint.CheckpointRestore(data)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        data = restored.data if "data" in items else None
        return restored.state, data, dict(restored.meta or {})

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def require_shared(directory: str | epath.PathLike, setting: str = "run.checkpoint_dir"):
    """With several processes, fail unless every one of them sees the same `directory`.

    Process 0 writes a fresh token there; all processes read it back and agree. Orbax's
    multi-host protocol (the primary finalises, every process writes shards) hangs on
    per-host local disks, so this fails first, on every process, with the fix.
    """
    if jax.process_count() == 1:
        return
    directory = _absolute(epath.Path(directory))
    token = np.frombuffer(uuid.uuid4().bytes, np.uint8)
    token = multihost_utils.broadcast_one_to_all(token)  # process 0's token, everywhere
    sentinel = directory / f".jaxrl-shared-{bytes(token).hex()}"
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        sentinel.write_text("every process must see this file\n")
    multihost_utils.sync_global_devices("jaxrl: shared checkpoint dir written")
    seen = np.array(sentinel.exists())
    everyone = multihost_utils.process_allgather(seen)
    multihost_utils.sync_global_devices("jaxrl: shared checkpoint dir checked")
    if jax.process_index() == 0:
        sentinel.unlink()
    if not np.all(everyone):
        blind = [int(i) for i in np.flatnonzero(~np.asarray(everyone))]
        raise ConfigError(
            f"{setting}={str(directory)!r} is not shared: processes {blind} of "
            f"{jax.process_count()} cannot see what process 0 wrote there. Every process "
            f"must checkpoint to one directory: set {setting} to a shared file system or a "
            "bucket (e.g. gs://BUCKET/RUN), the same on every host.")


def _absolute(path: epath.Path) -> epath.Path:
    return path if "://" in str(path) else epath.Path(path).absolute()


def _abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
