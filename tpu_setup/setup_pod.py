#!/usr/bin/env python3
"""Set up every worker of a TPU VM / pod slice: ship the repo, run tpu_setup/setup_env.sh,
then tpu_setup/check_tpu.py.

  python tpu_setup/setup_pod.py --tpu my-pod --zone us-central2-b
  python tpu_setup/setup_pod.py --tpu my-pod --zone us-central2-b --dry-run

Each worker's output goes to LOG_DIR/<worker id>.log; every worker ends by printing the
TPU devices JAX sees. Then run jobs with launch/tpu_pod.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from runner import run_in_order  # noqa: E402
from tpu_pod import add_tpu_arguments, install, on_all_workers, sync_commands  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tpu_arguments(parser)
    parser.add_argument("--log-dir", help="local folder for per-worker logs "
                        "(default: logs/TPU-setup)")
    args = parser.parse_args(argv)

    log_dir = args.log_dir or f"logs/{args.tpu}-setup"
    setup = f"{install(args)} && .venv/bin/python tpu_setup/check_tpu.py"
    commands = sync_commands(args) + [
        ["mkdir", "-p", log_dir],
        on_all_workers(args, setup, output_dir=log_dir),
    ]
    run_in_order(commands, args.dry_run)


if __name__ == "__main__":
    main()
