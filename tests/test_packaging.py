"""What a user meets outside a source checkout: the installed package, the docs' config paths,
and an import that leaves the process as it was."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# The default job, shrunk so it runs in seconds; nothing here changes which job it is.
SMALL_DEFAULT_JOB = ["loop.steps=1", "loop.progress=false", "ppo.num_envs=4",
                     "ppo.rollout_steps=8", "ppo.minibatches=1", "ppo.epochs=1",
                     "eval.episodes=2", "eval.baselines=false"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install .` (not editable) of a clean copy of the checkout into a fresh folder (no
    build/ left from earlier builds); the venv provides the dependencies."""
    source, site = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("site")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                             "--no-build-isolation", "--target", str(site), str(source)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return site


def _python(site: Path, cwd: Path, *args: str, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user has
    env["PYTHONPATH"] = str(site)  # ahead of the venv's editable jaxrl
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_installed_package_runs_the_default_job_from_another_directory(installed, tmp_path):
    where = _python(installed, tmp_path, "-c", "import jaxrl.launch as l; print(l.__file__, "
                    "l.resolve_path('ppo_cartpole'), l.resolve_path('configs/ppo_cartpole.yaml'))")
    assert where.returncode == 0, where.stderr[-3000:]
    module, by_name, by_path = map(Path, where.stdout.split())
    configs = installed / "jaxrl" / "configs"
    assert module.is_relative_to(installed)  # not the checkout
    assert by_name == by_path == configs / "ppo_cartpole.yaml"  # a doc's path works anywhere
    shipped = {p.name for p in configs.glob("*.yaml")}
    assert shipped == {p.name for p in (REPO / "configs").glob("*.yaml")}

    out = _python(installed, tmp_path, "-m", "jaxrl.launch", *SMALL_DEFAULT_JOB)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "runs" / "ppo_prospector" / "result.json").is_file()


def _user_docs() -> list[Path]:
    """Markdown files (tracked or new) and the docstrings of the scripts a user runs."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                             "*.md", "launch/*.py", "tpu_setup/*.py", "jaxrl/launch.py"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in listed.splitlines() if (REPO / line).is_file()]


def test_every_config_path_named_in_the_docs_exists():
    named = {(doc.relative_to(REPO), path) for doc in _user_docs()  # NAME: a placeholder
             for path in re.findall(r"\bconfigs/[a-z0-9_.-]+\.ya?ml\b", doc.read_text())}
    assert any(path == "configs/ppo_prospector.yaml" for _, path in named)  # the scan sees READMEs
    missing = sorted(f"{doc}: {path}" for doc, path in named if not (REPO / path).is_file())
    assert not missing, missing


_SNAPSHOT = """
import importlib, json, os, pkgutil, sys
import jax, flax, numpy as np

def settings():
    return {"jax": {k: repr(v) for k, v in jax.config.values.items()},
            "flax": {k: repr(getattr(flax.config, k)) for k in type(flax.config).__annotations__},
            "environ": dict(os.environ), "numpy print": repr(np.get_printoptions())}

before = settings()
import jaxrl
for m in pkgutil.walk_packages(jaxrl.__path__, "jaxrl."):
    if not m.name.endswith(".__main__"):  # a CLI entry runs on import
        importlib.import_module(m.name)
print(json.dumps({"before": before, "after": settings()}))
"""


def test_importing_jaxrl_changes_no_process_wide_setting():
    """jax and flax are imported first, so only what jaxrl's own modules do is compared."""
    out = subprocess.run([sys.executable, "-c", _SNAPSHOT], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.splitlines()[-1])
    for kind, before in seen["before"].items():
        after = seen["after"][kind]
        if isinstance(before, dict):
            changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
                       if before.get(k) != after.get(k)}
            assert not changed, f"importing jaxrl changed {kind}: {changed}"
        else:
            assert before == after, kind
