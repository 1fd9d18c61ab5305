"""Several processes on one mesh: SFT, HOPE and PPO like one process, shared checkpoints,
preemption, dead and stuck peers, and which recipes refuse.

Each test starts two local JAX processes x 4 CPU devices (the shape of a two-host pod slice)
through `python -m jaxrl.launch`, as a user of `launch/` would.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO, TEST_XLA_FLAGS, TINY_SFT_OVERRIDES, run_launch
from jaxrl.core.checkpoint import Checkpointer
from jaxrl.core.metrics import read_jsonl
from jaxrl.core.preemption import EXIT_STUCK
from jaxrl.launch import recipe_names

pytestmark = pytest.mark.multiprocess

TINY_PPO = ["ppo_prospector", "loop.steps=3", "loop.log_every=1", "loop.progress=false",
            "ppo.num_envs=16", "ppo.rollout_steps=16", "ppo.minibatches=2", "ppo.epochs=2",
            "eval.episodes=8", "eval.baselines=false", "eval.replays=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(args, run_dirs, *extra):
    """Two processes of one job; `run_dirs` is one dir (shared) or one per process."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS}  # its devices: distributed.local_device_count
    dirs = run_dirs if isinstance(run_dirs, (list, tuple)) else [run_dirs] * 2
    return [subprocess.Popen(
        [sys.executable, "-m", "jaxrl.launch", *args, f"run.dir={dirs[i]}",
         f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
         f"distributed.process_id={i}", "distributed.local_device_count=4", *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]


def finish(procs, timeout=600):
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_for_rows(procs, metrics, rows, timeout=300):
    deadline = time.time() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= rows):
        assert all(p.poll() is None for p in procs), finish(procs)[0][-3000:]
        assert time.time() < deadline, f"no {rows} metric rows in {timeout} s"
        time.sleep(0.1)


def losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def test_default_ppo_job_on_two_processes_matches_one(tmp_path):
    single = run_launch(*TINY_PPO, f"run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    procs = start_pair(TINY_PPO, tmp_path / "multi")
    outs = finish(procs)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "8 devices in 2 process(es)" in outs[0]
    assert (tmp_path / "multi" / "replays" / "ppo.jsonl").exists()  # process 0 alone, no hang
    assert len(losses(tmp_path / "multi")) == 3
    # reduction order differs between 1 x 8 and 2 x 4 devices: float noise only
    assert losses(tmp_path / "multi") == pytest.approx(losses(tmp_path / "single"), rel=1e-4, abs=1e-7)
    # one writer: process 1 logs nothing of its own
    assert [r["step"] for r in read_jsonl(tmp_path / "multi" / "metrics.jsonl")
            if "loss" in r] == [1, 2, 3]


def test_ppo_cartpole_on_two_local_devices(tmp_path):
    out = run_launch("configs/ppo_cartpole.yaml", "distributed.local_device_count=2",
                     "loop.steps=2", f"run.dir={tmp_path}", "loop.progress=false",
                     env={"XLA_FLAGS": TEST_XLA_FLAGS})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 devices in 1 process(es)" in out.stdout


SFT = ["sft_gpt2_shakespeare", "loop.steps=16", "loop.checkpoint_every=8", "loop.eval_every=0",
       "model.dropout=0.1", "mesh.data=-1", "mesh.fsdp=2", *TINY_SFT_OVERRIDES]


def test_sft_on_two_processes_matches_one_and_resumes_after_sigterm(tmp_path, corpus):
    """2 x 4 devices, SIGTERM to both mid-run, re-run: every step once, and the losses and the
    exported weights equal an uninterrupted 1 x 8 run. Dropout > 0, so the per-step keys and
    each process's data position are part of it. (Bitwise resume in one process: test_loop.)"""
    args = [*SFT, f"data.path={corpus}"]
    single = run_launch(*args, f"run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]

    run = tmp_path / "resumed"
    procs = start_pair(args, run)
    wait_for_rows(procs, run / "metrics.jsonl", 5)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outs = finish(procs, timeout=120)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert "SIGTERM: saved step" in out, out[-3000:]
    stopped = Checkpointer(run / "checkpoints").latest_step()
    assert 0 < stopped < 16  # it stopped mid-run, at one step both agreed on
    rerun = start_pair(args, run)
    outs = finish(rerun)
    for p, out in zip(rerun, outs):
        assert p.returncode == 0, out[-3000:]
    assert f"resumed from {run / 'checkpoints'} at step {stopped}" in outs[0]

    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == list(range(1, 17))
    assert losses(run) == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    assert Checkpointer(run / "checkpoints").latest_step() == 16
    exported = [load_file(d / "hf" / "model.safetensors") for d in (run, tmp_path / "single")]
    assert exported[0].keys() == exported[1].keys()
    for name in exported[0]:
        np.testing.assert_allclose(exported[0][name], exported[1][name], atol=1e-5, err_msg=name)


TINY_HOPE = ["hope_pilot", "model.mixer=titans", "model.writes=stop_gradient", "model.n_embd=16",
             "model.n_layer=1", "model.memory.heads=2", "model.memory.chunk_size=4",
             "model.memory.memory_chunk_size=8", "model.cms.periods=[4]", "data.seq_len=16",
             "data.batch_size=8", "loop.steps=3", "loop.log_every=1", "loop.eval_every=0",
             "loop.checkpoint_every=0", "loop.progress=false", "optimizer.warmup_steps=1",
             "optimizer.decay_steps=100", "eval_batches=1"]


def test_hope_on_two_processes(tmp_path, corpus):
    """sft_hope on 2 x 4 devices: both processes train to the end with finite losses and
    process 0 alone writes the export. (Loss equality with one device is held on the 8-device
    mesh in tests/test_hope.py; 2 x 4 against 1 x 8 was checked by hand, as the README says.)"""
    procs = start_pair([*TINY_HOPE, f"data.path={corpus}"], tmp_path / "multi")
    for p, out in zip(procs, finish(procs)):
        assert p.returncode == 0, out[-3000:]
    assert len(losses(tmp_path / "multi")) == 3
    assert all(np.isfinite(losses(tmp_path / "multi")))
    assert (tmp_path / "multi" / "hope" / "model.safetensors").is_file()


def test_killed_peer_ends_the_job(tmp_path, corpus):
    """SIGKILL one process mid-run: the survivor fails within 2 minutes and names the dead peer."""
    procs = start_pair([*SFT, f"data.path={corpus}", "loop.steps=100000"], tmp_path / "run",
                       "distributed.heartbeat_timeout_s=5")
    try:
        wait_for_rows(procs, tmp_path / "run" / "metrics.jsonl", 3)
        procs[1].kill()
        out = procs[0].communicate(timeout=120)[0]
        assert procs[0].returncode != 0, out[-3000:]
        assert "stopped sending heartbeats" in out, out[-3000:]
    finally:
        finish(procs, timeout=5)


def test_checkpoint_dir_not_shared_fails_at_start_up(tmp_path, corpus):
    """Two hosts with their own local disks: each gets its own run dir (and checkpoint dir)."""
    procs = start_pair([*SFT, f"data.path={corpus}"], [tmp_path / "host0", tmp_path / "host1"])
    for p, out in zip(procs, finish(procs, timeout=300)):
        assert p.returncode == 2, out[-3000:]
        assert "run.checkpoint_dir=" in out and "is not shared" in out, out[-3000:]
        assert "gs://" in out  # names the fix
    assert not list((tmp_path / "host0" / "checkpoints").glob("[0-9]*"))


def test_sigterm_ends_a_process_stuck_in_a_collective(tmp_path, corpus):
    """Peer stopped (SIGSTOP): the survivor blocks in a collective, yet SIGTERM still ends it."""
    args = [*SFT, f"data.path={corpus}", "loop.steps=100000"]
    procs = start_pair(args, tmp_path / "run", "run.preemption_grace_s=3",
                       "distributed.heartbeat_timeout_s=300")
    try:
        wait_for_rows(procs, tmp_path / "run" / "metrics.jsonl", 3)
        procs[1].send_signal(signal.SIGSTOP)
        time.sleep(1.0)  # process 0 is now waiting on its peer
        began = time.time()
        procs[0].send_signal(signal.SIGTERM)
        out = procs[0].communicate(timeout=60)[0]
        elapsed = time.time() - began
        assert procs[0].returncode == EXIT_STUCK, out[-3000:]
        assert "no step boundary was reached" in out and "Re-run the same command" in out
        assert elapsed < 30
    finally:
        procs[1].send_signal(signal.SIGCONT)
        finish(procs, timeout=5)


PROBE = """
import sys
from types import SimpleNamespace
from jaxrl import launch
from jaxrl.core.config import ConfigError, DistributedConfig
launch.init_distributed(DistributedConfig(coordinator=sys.argv[1], num_processes=2,
                                          process_id=int(sys.argv[2]), local_device_count=1))
for name in launch.recipe_names():
    try:
        launch.check_processes(launch.load_recipe(name, "probe"), SimpleNamespace(recipe=name))
        print("RUNS", name, flush=True)
    except ConfigError as e:
        print("REFUSES", name, e, flush=True)
"""


def test_every_recipe_runs_on_several_processes_or_refuses():
    """The runners are exactly the recipes shown above to run on two processes; each other
    recipe refuses before any device work, with its reason."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS}  # its devices: distributed.local_device_count
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, f"127.0.0.1:{port}", str(i)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = finish(procs, timeout=300)
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:]
    lines = [line.split(" ", 2) for line in outs[0].splitlines()
             if line.startswith(("RUNS ", "REFUSES "))]
    runs = {name for verdict, name, *_ in lines if verdict == "RUNS"}
    refusals = {name: why for verdict, name, *why in lines if verdict == "REFUSES"}
    assert runs == {"sft", "ppo", "sft_hope"}  # tested above: test_sft_*, test_default_ppo_*, test_hope_*
    assert set(refusals) == set(recipe_names()) - runs  # every other recipe, with a reason
    for name, (why,) in refusals.items():
        assert f"recipe {name!r} runs in one process, but this job has 2" in why
