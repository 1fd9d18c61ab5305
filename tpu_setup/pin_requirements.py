#!/usr/bin/env python3
"""Write tpu_setup/requirements.txt: the exact versions a tested venv runs, for every TPU worker.

Without pins each worker resolves jaxrl's `>=` dependencies on its own, at its own time, so two
workers of one pod (or a pod and the machine the tests ran on) can run different libraries.
This pins jaxrl's runtime dependencies from pyproject.toml and everything they pull in (not the
test/torch/rtl extras) at the versions installed in the venv that runs it, plus pip and
setuptools (they build jaxrl's native core) and JAX's TPU extra at the same JAX version (JAX
pins libtpu). Re-run it after changing dependencies, from a venv where the tests pass:

  .venv/bin/python tpu_setup/pin_requirements.py
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tpu_setup" / "requirements.txt"
BUILD_TOOLS = ["pip", "setuptools"]


def runtime_closure(roots: list[str]) -> set[str]:
    """Names of `roots` and of everything they require (with the extras they ask for)."""
    names: set[str] = set()
    todo = [(Requirement(r), frozenset()) for r in roots]
    seen = set()
    while todo:
        req, parent_extras = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in {"", *parent_extras}):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        todo += [(Requirement(r), key[1]) for r in metadata.requires(req.name) or []]
    return names


def main() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = runtime_closure(project["dependencies"]) | set(BUILD_TOOLS)
    pins = [f"{n}[tpu]=={metadata.version(n)}" if n == "jax" else f"{n}=={metadata.version(n)}"
            for n in sorted(names)]
    OUT.write_text("# Exact versions for TPU workers, written by tpu_setup/pin_requirements.py "
                   "(re-run it; do not edit).\n" + "\n".join(pins) + "\n")
    print(f"wrote {len(pins)} pins to {OUT}")


if __name__ == "__main__":
    main()
