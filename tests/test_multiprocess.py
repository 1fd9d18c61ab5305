"""Two local processes x 4 CPU devices train like one process with 8 devices."""

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_SFT_OVERRIDES, run_launch
from jaxrl.core.metrics import read_jsonl

pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(args, run_dir, *extra):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "jaxrl.launch", *args, f"run.dir={run_dir}",
               f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
               f"distributed.process_id={i}", "distributed.local_device_count=4", *extra]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def test_two_processes_match_one(tmp_path, corpus):
    args = ["sft_gpt2_shakespeare", f"data.path={corpus}", "loop.steps=6",
            "mesh.data=-1", "mesh.fsdp=2", *TINY_SFT_OVERRIDES]
    single = run_launch(*args, f"run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]

    procs = _start_pair(args, tmp_path / "multi")
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    def losses(run):
        return [r["loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "loss" in r]

    assert len(losses("multi")) == 6
    assert losses("multi") == pytest.approx(losses("single"), abs=1e-5)
    assert (tmp_path / "multi" / "hf" / "model.safetensors").exists()


def test_killed_peer_ends_the_job(tmp_path, corpus):
    """SIGKILL one process mid-run: the other must fail within 2 minutes and say why."""
    args = ["sft_gpt2_shakespeare", f"data.path={corpus}", "loop.steps=100000",
            *TINY_SFT_OVERRIDES]
    procs = _start_pair(args, tmp_path / "run", "distributed.heartbeat_timeout_s=5")
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") > 3):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            assert time.time() < deadline, "the two processes logged no steps in 300 s"
            time.sleep(0.2)
        procs[1].kill()
        try:
            out = procs[0].communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            pytest.fail("the surviving process still ran 120 s after its peer died")
        assert procs[0].returncode != 0, out[-3000:]
        assert "stopped sending heartbeats" in out, out[-3000:]  # names the dead peer
    finally:
        for p in procs:
            p.kill()
            p.wait()
