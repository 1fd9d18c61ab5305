"""Orbax checkpoints: train state + data iterator state + loop metadata, saved atomically.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
(even SIGKILL) mid-save leaves the previous checkpoint intact and restorable. Restoring takes
the current state as a template: shapes, dtypes and *shardings* come from it, so a checkpoint
written on one mesh restores onto another.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, *, data: dict | None = None, meta: dict | None = None):
        """Start saving (async); returns at once. Call `wait()` before exiting."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data or {}),
                meta=ocp.args.JsonSave(meta or {}),
            ),
            force=True,
        )

    def restore(self, state_template, step: int | None = None):
        """-> (state, data, meta) of `step` (default: newest), laid out like `state_template`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(_abstract, state_template)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, dict(restored.data or {}), dict(restored.meta or {})

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def _abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
