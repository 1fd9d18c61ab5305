"""Pod scripts: the exact commands their --dry-run prints, and that the quoted remote
commands hand jaxrl.launch the same arguments after a real shell has parsed them.

The scripts drive gcloud, ssh and SLURM, which cannot run here. What can run here does:
each remote command is executed by bash in a fake worker home whose `jaxrl.launch`
prints the argv it received, and the ssh launcher runs against a local `ssh` stand-in.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU_POD = REPO / "launch" / "tpu_pod.py"
GPU_CLUSTER = REPO / "launch" / "gpu_cluster.py"
CREATE_TPU = REPO / "tpu_setup" / "create_tpu.py"
SETUP_POD = REPO / "tpu_setup" / "setup_pod.py"

GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
WHERE = ["--zone=us-central2-b", "--project=my-proj", "--worker=all"]
REPLACE_CODE = ("mkdir -p jaxrl && find jaxrl -mindepth 1 -maxdepth 1 -not -name .venv "
                "-not -name runs -exec rm -rf {} + && tar -xzf /tmp/jaxrl-src.tar.gz -C jaxrl")


def run(script: Path, *args: str, env: dict | None = None, cwd: Path = REPO):
    return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=60)


def dry_run(script: Path, *args: str) -> list[list[str]]:
    result = run(script, "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


@pytest.fixture
def worker_home(tmp_path: Path) -> Path:
    """A home directory laid out like a set-up worker: ~/jaxrl with .venv/bin/python and a
    `jaxrl.launch` that prints its arguments and WANDB_MODE as JSON."""
    repo = tmp_path / "home" / "jaxrl"
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (repo / "jaxrl").mkdir()
    (repo / "jaxrl" / "__init__.py").write_text("")
    (repo / "jaxrl" / "launch.py").write_text(
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'wandb': os.environ.get('WANDB_MODE')}))\n")
    return tmp_path / "home"


def in_shell(command: str, cwd: Path, **env: str) -> dict:
    """Run a remote command string the way a worker's login shell would."""
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            cwd=cwd, env={**os.environ, **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- TPU pod -------------------------------------------------------------------------

def test_tpu_pod_dry_run_ships_repo_then_runs_config_on_every_worker(worker_home):
    commands = dry_run(TPU_POD, "--tpu", "my-pod", "--zone", "us-central2-b",
                       "--project", "my-proj", "--env", "WANDB_MODE=online",
                       "--checkpoint-dir", "gs://bucket/my run",
                       "configs/gpt2 sft.yaml", "loop.steps=1000", "run.dir=/tmp/my run")
    job = ("cd jaxrl && env WANDB_MODE=online .venv/bin/python -m jaxrl.launch "
           "'configs/gpt2 sft.yaml' distributed.auto=true loop.steps=1000 'run.dir=/tmp/my run' "
           "'run.checkpoint_dir=gs://bucket/my run'")
    assert commands == [
        ["git", "-C", str(REPO), "archive", "--format=tar.gz",
         "--output=/tmp/jaxrl-src.tar.gz", "HEAD"],
        [*GCLOUD_TPU, "scp", "/tmp/jaxrl-src.tar.gz", "my-pod:/tmp/jaxrl-src.tar.gz", *WHERE],
        [*GCLOUD_TPU, "ssh", "my-pod", *WHERE, "--command", REPLACE_CODE],
        [*GCLOUD_TPU, "ssh", "my-pod", *WHERE, "--command",
         "cd jaxrl && bash tpu_setup/setup_env.sh"],
        ["mkdir", "-p", "logs/my-pod"],
        [*GCLOUD_TPU, "ssh", "my-pod", *WHERE, "--command", job,
         "--output-directory=logs/my-pod"],
    ]
    assert in_shell(job, worker_home) == {
        "argv": ["configs/gpt2 sft.yaml", "distributed.auto=true", "loop.steps=1000",
                 "run.dir=/tmp/my run", "run.checkpoint_dir=gs://bucket/my run"],
        "wandb": "online"}


def test_tpu_pod_git_sync_and_home_relative_dir():
    commands = dry_run(TPU_POD, "--tpu", "p", "--zone", "z", "--sync", "git",
                       "--remote-dir", "~/src/jaxrl", "--log-dir", "out", "configs/x.yaml",
                       "run.checkpoint_dir=/nfs/ckpt")
    ssh = [*GCLOUD_TPU, "ssh", "p", "--zone=z", "--worker=all", "--command"]
    assert commands == [
        [*ssh, "git -C src/jaxrl pull --ff-only && git -C src/jaxrl clean -fdx -e /.venv -e /runs"],
        [*ssh, "cd src/jaxrl && bash tpu_setup/setup_env.sh"],
        ["mkdir", "-p", "out"],
        [*ssh, "cd src/jaxrl && .venv/bin/python -m jaxrl.launch configs/x.yaml "
               "distributed.auto=true run.checkpoint_dir=/nfs/ckpt",
         "--output-directory=out"],
    ]


def test_tpu_pod_requires_a_shared_checkpoint_dir():
    out = subprocess.run([sys.executable, str(TPU_POD), "--dry-run", "--tpu", "p", "--zone", "z",
                          "configs/ppo_cartpole.yaml"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert "--checkpoint-dir gs://BUCKET/RUN" in out.stderr and "every worker" in out.stderr


# --- TPU setup -----------------------------------------------------------------------

def test_create_tpu_on_demand_and_spot():
    common = ["--name", "my-pod", "--zone", "us-central2-b", "--accelerator-type", "v4-32"]
    assert dry_run(CREATE_TPU, *common) == [
        [*GCLOUD_TPU, "create", "my-pod", "--zone=us-central2-b", "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base"]]
    assert dry_run(CREATE_TPU, *common, "--spot", "--project", "my-proj") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "my-pod",
         "--node-id=my-pod", "--zone=us-central2-b", "--accelerator-type=v4-32",
         "--runtime-version=tpu-ubuntu2204-base", "--spot", "--project=my-proj"]]


def test_setup_pod_ships_repo_and_runs_setup_env_on_every_worker():
    commands = dry_run(SETUP_POD, "--tpu", "my-pod", "--zone", "us-central2-b",
                       "--project", "my-proj")
    assert commands[1] == [*GCLOUD_TPU, "scp", "/tmp/jaxrl-src.tar.gz",
                           "my-pod:/tmp/jaxrl-src.tar.gz", *WHERE]
    assert commands[2:] == [
        [*GCLOUD_TPU, "ssh", "my-pod", *WHERE, "--command", REPLACE_CODE],
        ["mkdir", "-p", "logs/my-pod-setup"],
        [*GCLOUD_TPU, "ssh", "my-pod", *WHERE, "--command",
         "cd jaxrl && bash tpu_setup/setup_env.sh && .venv/bin/python tpu_setup/check_tpu.py",
         "--output-directory=logs/my-pod-setup"],
    ]
    assert subprocess.run(["bash", "-n", str(REPO / "tpu_setup" / "setup_env.sh")]).returncode == 0
    assert (REPO / "tpu_setup" / "check_tpu.py").is_file()


def test_deploy_leaves_no_file_of_an_earlier_version(tmp_path):
    """The archive deploy, run by bash in a worker home that holds an older checkout: only
    HEAD's files remain, beside the worker's own .venv and runs/."""
    commands = dry_run(TPU_POD, "--tpu", "p", "--zone", "z", "--checkpoint-dir", "gs://b/r",
                       "configs/ppo_cartpole.yaml")
    archive = tmp_path / "src.tar.gz"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()  # fixed: others may commit meanwhile
    assert commands[0][-1] == "HEAD"
    make_archive = [a.replace("/tmp/jaxrl-src.tar.gz", str(archive)) for a in commands[0][:-1]]
    subprocess.run([*make_archive, head], check=True, timeout=60)
    worker = tmp_path / "home" / "jaxrl"
    for old in ["jaxrl/renamed_module.py", "jaxrl/envs/prospector/_native.so", "configs/old.yaml",
                ".venv/bin/python", "runs/sft/checkpoints/200/state"]:
        (worker / old).parent.mkdir(parents=True, exist_ok=True)
        (worker / old).write_text("from an earlier deploy")
    replace = commands[2][commands[2].index("--command") + 1]
    subprocess.run(["bash", "-c", replace.replace("/tmp/jaxrl-src.tar.gz", str(archive))],
                   cwd=worker.parent, check=True, timeout=60)

    shipped = subprocess.run(["git", "ls-tree", "-r", "--name-only", head], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    on_worker = [str(p.relative_to(worker)) for p in worker.rglob("*") if not p.is_dir()]
    assert sorted(on_worker) == sorted([*shipped, ".venv/bin/python",
                                        "runs/sft/checkpoints/200/state"])
    assert (worker / "jaxrl" / "launch.py").read_bytes() == subprocess.run(
        ["git", "show", f"{head}:jaxrl/launch.py"], cwd=REPO, capture_output=True).stdout


def test_workers_install_exact_versions_of_every_dependency():
    """Each runtime dependency in pyproject.toml is pinned (==) in the file setup_env.sh installs,
    at a version its own specifier allows; JAX with its TPU extra."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    assert "pip install -q -r tpu_setup/requirements.txt" in (
        REPO / "tpu_setup" / "setup_env.sh").read_text()
    lines = (REPO / "tpu_setup" / "requirements.txt").read_text().splitlines()
    pins = {canonicalize_name(r.name): r
            for r in (Requirement(line) for line in lines if not line.startswith("#"))}
    assert all(str(r.specifier).startswith("==") and "*" not in str(r.specifier)
               for r in pins.values())
    assert pins["jax"].extras == {"tpu"}
    for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        wanted = Requirement(line)
        pin = pins.get(canonicalize_name(wanted.name))
        assert pin is not None, f"{wanted.name} is not pinned; run tpu_setup/pin_requirements.py"
        version = str(pin.specifier).removeprefix("==")
        assert wanted.specifier.contains(version), f"{pin} does not satisfy {wanted}"


# --- GPU cluster ---------------------------------------------------------------------

def test_gpu_cluster_ssh_gives_each_host_its_process_id(tmp_path, worker_home):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# training nodes\nalice@gpu0\ngpu1  # spare\n\ngpu2\n")
    commands = dry_run(GPU_CLUSTER, "--hosts-file", str(hosts), "--port", "9999",
                       "configs/x.yaml", "run.dir=/tmp/my run")
    assert [argv[:-1] for argv in commands] == [
        ["ssh", "-tt", "-o", "BatchMode=yes", host] for host in ["alice@gpu0", "gpu1", "gpu2"]]
    for process_id, argv in enumerate(commands):
        assert in_shell(argv[-1], worker_home)["argv"] == [
            "configs/x.yaml", "run.dir=/tmp/my run", "distributed.coordinator=gpu0:9999",
            "distributed.num_processes=3", f"distributed.process_id={process_id}"]


def test_gpu_cluster_sbatch_script(worker_home):
    result = run(GPU_CLUSTER, "--slurm-nodes", "4", "--gpus-per-node", "8", "--partition",
                 "a100", "--env", "WANDB_MODE=offline", "configs/x.yaml", "run.dir=/tmp/my run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --partition=a100",
                 "export WANDB_MODE=offline",
                 'export COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
                 '| head -n 1):12355"']:
        assert line in lines
    srun = shlex.split(lines[-1])
    assert srun[0] == "srun" and srun[2:4] == ["bash", "-c"]
    # Each task's own shell expands the SLURM variables into its overrides.
    launched = in_shell(srun[4], worker_home / "jaxrl", COORDINATOR="node7:12355",
                        SLURM_NTASKS="4", SLURM_PROCID="2")
    assert launched["argv"] == [
        "configs/x.yaml", "run.dir=/tmp/my run", "distributed.coordinator=node7:12355",
        "distributed.num_processes=4", "distributed.process_id=2"]


def test_gpu_cluster_stops_all_processes_when_one_fails(tmp_path, worker_home):
    """Runs the launcher for real against an `ssh` that runs the command locally: the
    process with id 1 fails once process 0 is up, so process 0 (which would sleep a
    minute) must be stopped by the launcher."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text('#!/bin/bash\nexec bash -c "${@: -1}"\n')
    (bin_dir / "ssh").chmod(0o755)
    (worker_home / "jaxrl" / "jaxrl" / "launch.py").write_text(
        "import signal, sys, time\n"
        "def stopped(*_):\n    print('stopped by SIGTERM', flush=True)\n    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stopped)\n"
        "print('started', sys.argv[-1], flush=True)\n"
        "if sys.argv[-1].endswith('=1'):\n"
        f"    while 'started' not in open({str(tmp_path / 'logs' / 'process-0.log')!r}).read():\n"
        "        time.sleep(0.05)\n"
        "    sys.exit(3)\n"
        "time.sleep(60)\n"
        "print('slept a minute', flush=True)\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = run(GPU_CLUSTER, "--hosts", "gpu0,gpu1", "--log-dir", str(tmp_path / "logs"),
                 "configs/x.yaml", env=env, cwd=worker_home)
    assert result.returncode == 3
    assert "process-1.log" in result.stderr
    logs = tmp_path / "logs"
    assert (logs / "process-1.log").read_text().strip() == "started distributed.process_id=1"
    assert (logs / "process-0.log").read_text().splitlines() == [
        "started distributed.process_id=0", "stopped by SIGTERM"]


# --- bad input -----------------------------------------------------------------------

@pytest.mark.parametrize("script, args, message", [
    (TPU_POD, ["--tpu", "p", "configs/x.yaml"], "--zone"),
    (TPU_POD, ["--tpu", "p", "--zone", "z"], "config"),
    (TPU_POD, ["--tpu", "p", "--zone", "z", "--env", "NO_EQUALS", "c.yaml"], "KEY=VALUE"),
    (SETUP_POD, ["--zone", "z"], "--tpu"),
    (CREATE_TPU, ["--name", "p", "--zone", "z"], "--accelerator-type"),
    (GPU_CLUSTER, ["configs/x.yaml"], "--hosts --hosts-file --slurm-nodes"),
    (GPU_CLUSTER, ["--hosts-file", "/no/such/hosts.txt", "c.yaml"], "no such file"),
    (GPU_CLUSTER, ["--hosts", "gpu0,gpu0", "c.yaml"], "listed twice"),
])
def test_bad_arguments_exit_2_naming_the_problem(script, args, message):
    result = run(script, "--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("script, args, program", [
    (CREATE_TPU, ["--name", "p", "--zone", "z", "--accelerator-type", "v4-8"], "gcloud"),
    (TPU_POD, ["--tpu", "p", "--zone", "z", "--sync", "none", "--checkpoint-dir", "gs://b/r",
               "c.yaml"], "gcloud"),
    (GPU_CLUSTER, ["--hosts", "gpu0,gpu1", "c.yaml"], "ssh"),
])
def test_missing_program_fails_before_running_anything(tmp_path, script, args, program):
    bin_dir = tmp_path / "bin"  # only the everyday tools, never gcloud or ssh
    bin_dir.mkdir()
    for tool in ["mkdir", "git"]:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = run(script, *args, env={**os.environ, "PATH": str(bin_dir)}, cwd=tmp_path)
    assert result.returncode == 2
    assert f"`{program}` was not found on PATH" in result.stderr
    assert not (tmp_path / "logs").exists()
