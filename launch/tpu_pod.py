#!/usr/bin/env python3
"""Run a jaxrl config on every worker of a Cloud TPU VM or pod slice.

Replaces the code on each worker with this repository's HEAD, installs the pinned versions in
tpu_setup/requirements.txt (tpu_setup/setup_env.sh), then starts
`python -m jaxrl.launch CONFIG [overrides]` on all of them at once
(`gcloud compute tpus tpu-vm ssh --worker=all`) with `distributed.auto=true`, so each
worker's `jax.distributed.initialize()` finds its peers from the TPU metadata.
Each worker's output goes to LOG_DIR/<worker id>.log on this machine.

  python launch/tpu_pod.py --tpu my-pod --zone us-central2-b --checkpoint-dir gs://B/sft \
      configs/sft_gpt2_shakespeare.yaml loop.steps=1000
  python launch/tpu_pod.py --dry-run --tpu my-pod --zone us-central2-b \
      --checkpoint-dir gs://B/ppo configs/ppo_cartpole.yaml
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from runner import launch_command, parse_env, remote_path, run_in_order

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = "/tmp/jaxrl-src.tar.gz"
KEEP = (".venv", "runs")  # made on the worker (environment, run outputs): a deploy keeps them


def gcloud_tpu(args, verb: str, *operands: str) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB OPERANDS --zone=Z [--project=P] --worker=all`."""
    argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, *operands, f"--zone={args.zone}"]
    if args.project:
        argv.append(f"--project={args.project}")
    return argv + ["--worker=all"]


def on_all_workers(args, command: str, output_dir: str | None = None) -> list[str]:
    """Run one shell command on every worker at the same time."""
    argv = gcloud_tpu(args, "ssh", args.tpu) + ["--command", command]
    if output_dir:
        argv.append(f"--output-directory={output_dir}")
    return argv


def sync_commands(args) -> list[list[str]]:
    """Commands that make REMOTE_DIR on every worker hold this checkout's code and nothing older.

    `archive` ships the committed HEAD (`git archive`), so what runs is a commit you can name,
    and empties REMOTE_DIR before extracting it (all but KEEP): a file deleted or renamed here
    does not linger there. `git` pulls on each worker (the repository must already be cloned
    there) and removes every file git does not track, KEEP aside; `none` leaves the workers as
    they are.
    """
    remote_dir = shlex.quote(remote_path(args.remote_dir))
    if args.sync == "archive":
        keep = " ".join(f"-not -name {name}" for name in KEEP)
        replace = (f"mkdir -p {remote_dir} && find {remote_dir} -mindepth 1 -maxdepth 1 {keep} "
                   f"-exec rm -rf {{}} + && tar -xzf {ARCHIVE} -C {remote_dir}")
        return [
            ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"],
            gcloud_tpu(args, "scp", ARCHIVE, f"{args.tpu}:{ARCHIVE}"),
            on_all_workers(args, replace),
        ]
    if args.sync == "git":
        keep = " ".join(f"-e /{name}" for name in KEEP)
        return [on_all_workers(args, f"git -C {remote_dir} pull --ff-only && "
                                     f"git -C {remote_dir} clean -fdx {keep}")]
    return []


def install(args) -> str:
    """A worker's shell command: tpu_setup/setup_env.sh, which installs the pinned versions and
    rebuilds jaxrl's native core for the code just shipped (a deploy removes the old build)."""
    return f"cd {shlex.quote(remote_path(args.remote_dir))} && bash tpu_setup/setup_env.sh"


def add_tpu_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with tpu_setup/setup_pod.py: which TPU, and how code gets onto it."""
    parser.add_argument("--tpu", required=True, help="TPU VM / pod slice name")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b")
    parser.add_argument("--project", help="GCP project (default: gcloud's configured one)")
    parser.add_argument("--remote-dir", default="jaxrl",
                        help="repository path on the workers, relative to home (default: jaxrl)")
    parser.add_argument("--sync", choices=["archive", "git", "none"], default="archive",
                        help="how code reaches the workers: scp `git archive HEAD` (default), "
                        "`git pull` on each worker, or not at all (nor reinstalled)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands, one per line, instead of running them")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tpu_arguments(parser)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable)")
    parser.add_argument("--log-dir", help="local folder for per-worker logs (default: logs/TPU)")
    parser.add_argument("--checkpoint-dir", help="a directory every worker sees, e.g. "
                        "gs://BUCKET/RUN or an NFS mount (passed as run.checkpoint_dir; "
                        "required unless an override sets it)")
    parser.add_argument("config", help="config path inside the repository "
                        "(e.g. configs/ppo_cartpole.yaml) or a config name")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides for jaxrl.launch")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.checkpoint_dir:
        overrides.append(f"run.checkpoint_dir={args.checkpoint_dir}")
    if not any(o.startswith("run.checkpoint_dir=") and o.partition("=")[2] for o in overrides):
        parser.error("a pod needs one checkpoint directory every worker sees (each worker's "
                     "disk is its own): pass --checkpoint-dir gs://BUCKET/RUN (or an NFS path); "
                     "the job checks at start-up that all workers see it")

    log_dir = args.log_dir or f"logs/{args.tpu}"
    job = launch_command(".venv/bin/python", args.config,
                         ["distributed.auto=true", *overrides], parse_env(args.env))
    setup = [on_all_workers(args, install(args))] if args.sync != "none" else []
    commands = sync_commands(args) + setup + [
        ["mkdir", "-p", log_dir],
        on_all_workers(args, f"cd {shlex.quote(remote_path(args.remote_dir))} && {job}",
                       output_dir=log_dir),
    ]
    run_in_order(commands, args.dry_run)


if __name__ == "__main__":
    main()
