#!/usr/bin/env python3
"""Run a jaxrl config across several GPU hosts: one process per host, over ssh or SLURM.

Every process gets the same config plus
`distributed.coordinator=HOST0:PORT distributed.num_processes=N distributed.process_id=I`,
so `jaxrl.launch` calls `jax.distributed.initialize` before touching a device. Each
process drives all GPUs of its host. The repository and its .venv must already be at
REMOTE_DIR on every host (a shared filesystem, or your own sync).

ssh: starts the N processes from here, each writing LOG_DIR/process-I.log; if one
fails, the others are stopped.
  python launch/gpu_cluster.py --hosts gpu0,gpu1 configs/sft_gpt2_shakespeare.yaml loop.steps=1000
  python launch/gpu_cluster.py --hosts-file hosts.txt --dry-run configs/sft_gpt2_shakespeare.yaml

SLURM: prints an sbatch script (it submits nothing, so --dry-run changes nothing here).
  python launch/gpu_cluster.py --slurm-nodes 4 --gpus-per-node 8 \
      configs/sft_gpt2_shakespeare.yaml > job.sbatch
  sbatch job.sbatch
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from runner import fail, launch_command, parse_env, remote_path, run_together


def read_hosts(args) -> list[str]:
    """Hosts from --hosts a,b or --hosts-file (one per line, `#` comments allowed)."""
    if args.hosts:
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    else:
        path = Path(args.hosts_file)
        if not path.is_file():
            fail(f"--hosts-file {path}: no such file (one host per line, e.g. `user@gpu0`)")
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        hosts = [line for line in lines if line]
    if not hosts:
        fail("no hosts given: --hosts gpu0,gpu1 or a --hosts-file with one host per line")
    if len(set(hosts)) != len(hosts):
        fail(f"a host is listed twice in {hosts}: this script starts one process per host")
    return hosts


def ssh_commands(args, hosts: list[str]) -> list[list[str]]:
    """One `ssh HOST 'cd DIR && python -m jaxrl.launch ...'` per host.

    `-tt` gives the remote process a terminal, so stopping the local ssh (Ctrl-C, or a
    failed peer) hangs it up instead of leaving it holding the GPUs.
    """
    coordinator = f"{hosts[0].rsplit('@', 1)[-1]}:{args.port}"
    env = parse_env(args.env)
    commands = []
    for process_id, host in enumerate(hosts):
        overrides = [*args.overrides, f"distributed.coordinator={coordinator}",
                     f"distributed.num_processes={len(hosts)}",
                     f"distributed.process_id={process_id}"]
        job = launch_command(args.python, args.config, overrides, env)
        remote = f"cd {shlex.quote(remote_path(args.remote_dir or 'jaxrl'))} && {job}"
        commands.append(["ssh", "-tt", "-o", "BatchMode=yes", host, remote])
    return commands


def sbatch_script(args) -> str:
    """An sbatch script: one task per node, node 0 coordinates, SLURM numbers the processes.

    The variables in the srun line are expanded by each task's own shell, so every task
    sees its own SLURM_PROCID.
    """
    job = (launch_command(args.python, args.config, args.overrides, [])
           + ' distributed.coordinator="$COORDINATOR"'
           + ' distributed.num_processes="$SLURM_NTASKS"'
           + ' distributed.process_id="$SLURM_PROCID"')
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.slurm_nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        "#SBATCH --output=%x-%j.out",
    ]
    if args.partition:
        header.append(f"#SBATCH --partition={args.partition}")
    if args.time:
        header.append(f"#SBATCH --time={args.time}")
    body = ["set -euo pipefail"]
    if args.remote_dir:
        body.append(f"cd {shlex.quote(args.remote_dir)}")
    body.append(f"mkdir -p {shlex.quote(args.log_dir)}")
    body += [f"export {shlex.quote(pair)}" for pair in parse_env(args.env)]
    body += [
        'export COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
        f':{args.port}"',
        f"srun --output={shlex.quote(args.log_dir)}/%x-%j-process-%t.log "
        f"bash -c {shlex.quote(job)}",
    ]
    return "\n".join(header + [""] + body) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--hosts", help="comma-separated ssh hosts; the first one coordinates")
    where.add_argument("--hosts-file", help="file with one ssh host per line")
    where.add_argument("--slurm-nodes", type=int, help="print an sbatch script for this many nodes")
    parser.add_argument("--port", type=int, default=12355, help="coordinator port on host 0")
    parser.add_argument("--remote-dir",
                        help="repository path on every host (ssh: relative to home, default "
                        "jaxrl; SLURM: default the directory you submit from)")
    parser.add_argument("--python", default=".venv/bin/python",
                        help="interpreter, relative to --remote-dir (default: .venv/bin/python)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable)")
    parser.add_argument("--log-dir", default="logs/gpu_cluster",
                        help="ssh: local folder for logs; SLURM: folder for job logs")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="SLURM only")
    parser.add_argument("--partition", help="SLURM only")
    parser.add_argument("--time", help="SLURM only: time limit, e.g. 24:00:00")
    parser.add_argument("--job-name", default="jaxrl", help="SLURM only")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the ssh commands, one per line, instead of running them")
    parser.add_argument("config", help="config path inside the repository "
                        "(e.g. configs/ppo_cartpole.yaml) or a config name")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides for jaxrl.launch")
    args = parser.parse_args(argv)

    if args.slurm_nodes is not None:
        if args.slurm_nodes < 1:
            fail(f"--slurm-nodes {args.slurm_nodes}: need at least 1 node")
        print(sbatch_script(args), end="")
        return
    hosts = read_hosts(args)
    logs = [Path(args.log_dir) / f"process-{i}.log" for i in range(len(hosts))]
    run_together(ssh_commands(args, hosts), logs, args.dry_run)


if __name__ == "__main__":
    main()
