"""Test setup: 8 fake CPU devices, set before JAX initialises its backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is mostly compiles of tiny programs, so tests compile with LLVM at -O0: the same
# HLO and the same semantics, a third less wall time (822 -> 565 s on 2 cores); a test that
# trains for long runs slower (CartPole +13 s). Users and the benchmarks keep XLA's default.
# Set before the user's XLA_FLAGS, which win.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("WANDB_MODE", "disabled")
# One XLA compilation cache for the session, shared with every `python -m jaxrl.launch` the tests
# start: the same tiny configs compile once instead of once per subprocess (a cached executable
# is the same binary, so bitwise-resume checks still hold). Removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="jaxrl-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    # Every program, even a 30 ms slice: a launched job compiles dozens of those (9.6 s instead of
    # 15.7 s for a tiny SFT job whose programs are cached).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

import jaxrl  # noqa: E402,F401  (its XLA:CPU flags must be set before the backend starts)

jax.config.update("jax_num_cpu_devices", 8)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


# A GPT-2 small enough that a compile plus a few dozen steps take seconds on 2 cores.
TINY_SFT_OVERRIDES = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_positions=64",
    "data.seq_len=16", "data.batch_size=8", "optimizer.warmup_steps=2",
    "optimizer.decay_steps=1000", "loop.progress=false", "loop.log_every=1",
    "eval_batches=1", "samples.max_new_tokens=4",
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small text corpus written by the test (no external data needed)."""
    import this  # noqa: F401  (the Zen of Python, shipped with Python)
    import codecs

    zen = codecs.decode(this.s, "rot13")
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join([zen] * 20))
    return path


def run_launch(*args, cwd=None, timeout=600, env=None):
    """`python -m jaxrl.launch ARGS` in a subprocess with 8 fake CPU devices."""
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "jaxrl.launch", *map(str, args)], cwd=cwd or REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


# scripts/test.sh runs the suite on 2 pytest-xdist workers, one file per worker at a time
# (`--dist loadfile`, so module fixtures compile once). Files in this order go first, the
# longest ahead, so neither worker is left with one long file at the end.
LONGEST_FIRST = ["test_multihost.py", "test_ppo.py", "test_chunk_ttt.py", "test_eval_lm.py",
                 "test_hope.py", "test_gpt2.py", "test_prospector.py", "test_reinforce.py",
                 "test_corpus.py", "test_packaging.py", "test_sharding.py", "test_rtl_env.py",
                 "test_distill.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
