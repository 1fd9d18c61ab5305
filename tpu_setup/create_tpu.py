#!/usr/bin/env python3
"""Create a Cloud TPU VM or pod slice for jaxrl (on-demand, or Spot via a queued resource).

  python tpu_setup/create_tpu.py --name my-pod --zone us-central2-b --accelerator-type v4-32
  python tpu_setup/create_tpu.py --name my-pod --zone us-central2-b --accelerator-type v4-32 --spot

Spot capacity is requested as a queued resource: the command returns once the request is
queued; `gcloud compute tpus queued-resources describe NAME --zone ZONE` shows when it is
ACTIVE. Then set the workers up with tpu_setup/setup_pod.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from runner import run_in_order  # noqa: E402


def create_command(args) -> list[str]:
    if args.spot:
        argv = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
                f"--node-id={args.name}", f"--zone={args.zone}",
                f"--accelerator-type={args.accelerator_type}",
                f"--runtime-version={args.version}", "--spot"]
    else:
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name,
                f"--zone={args.zone}", f"--accelerator-type={args.accelerator_type}",
                f"--version={args.version}"]
    if args.project:
        argv.append(f"--project={args.project}")
    return argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="TPU name (also the queued-resource id)")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-b (v5p)")
    parser.add_argument("--accelerator-type", required=True,
                        help="TPU generation and chip count, e.g. v4-8 (one host), v4-32 (pod)")
    parser.add_argument("--version", default="tpu-ubuntu2204-base",
                        help="TPU software version (default: tpu-ubuntu2204-base)")
    parser.add_argument("--project", help="GCP project (default: gcloud's configured one)")
    parser.add_argument("--spot", action="store_true",
                        help="Spot capacity through a queued resource (cheaper, preemptible)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command instead of running it")
    args = parser.parse_args(argv)
    run_in_order([create_command(args)], args.dry_run)


if __name__ == "__main__":
    main()
