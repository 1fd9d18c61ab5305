"""Print or run a list of shell commands: the one piece every pod script shares.

Kept to the standard library so the scripts run on a laptop that has only Python
and the cloud CLI, not jaxrl's dependencies.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

INSTALL_HINTS = {
    "gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) "
    "and run `gcloud auth login`",
    "ssh": "install an OpenSSH client and set up key-based login to every host",
    "git": "install git; the repository is shipped with `git archive`",
}


def fail(message: str) -> None:
    """Exit with status 2 and a message, like argparse does for bad arguments."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_env(pairs: list[str]) -> list[str]:
    """Validate `--env KEY=VALUE` arguments; return them unchanged."""
    for pair in pairs:
        key, sep, _ = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            fail(f"--env {pair!r}: expected KEY=VALUE with KEY a shell variable name, "
                 "e.g. --env WANDB_MODE=online")
    return pairs


def remote_path(path: str) -> str:
    """A path for a remote shell: `~/x` becomes `x` (ssh starts in the home directory),
    because `~` would not expand once quoted."""
    return path[2:] if path.startswith("~/") else path


def launch_command(python: str, config: str, overrides: list[str], env: list[str]) -> str:
    """`env K=V python -m jaxrl.launch CONFIG OVERRIDES`, quoted for a remote shell."""
    argv = (["env", *env] if env else []) + [python, "-m", "jaxrl.launch", config, *overrides]
    return shlex.join(argv)


def require_programs(commands: list[list[str]]) -> None:
    """Fail before running anything if a program the commands need is not installed."""
    for program in dict.fromkeys(argv[0] for argv in commands):
        if shutil.which(program) is None:
            hint = INSTALL_HINTS.get(program, f"install {program}")
            fail(f"`{program}` was not found on PATH: {hint}. "
                 "Use --dry-run to see the commands without running them.")


def run_in_order(commands: list[list[str]], dry_run: bool) -> None:
    """Print (dry run) or run each command; stop at the first failure with its exit status."""
    if dry_run:
        for argv in commands:
            print(shlex.join(argv))
        return
    require_programs(commands)
    for argv in commands:
        print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
        status = subprocess.run(argv).returncode
        if status != 0:
            print(f"error: command failed with exit status {status}: {shlex.join(argv)}",
                  file=sys.stderr)
            sys.exit(status)


def run_together(commands: list[list[str]], logs: list[Path], dry_run: bool) -> None:
    """Start all commands at once, each writing to its own log; if one fails, stop the rest.

    A multi-host job cannot finish without all its processes, so waiting on the others
    after one has died only wastes the machines.
    """
    if dry_run:
        for argv in commands:
            print(shlex.join(argv))
        return
    require_programs(commands)
    procs = []
    for argv, log in zip(commands, logs):
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"+ {shlex.join(argv)} > {log}", file=sys.stderr, flush=True)
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
    while True:
        codes = [p.poll() for p in procs]
        if None not in codes or any(code not in (None, 0) for code in codes):
            break
        time.sleep(1.0)
    failed = [(p, log) for p, log in zip(procs, logs) if p.poll() not in (None, 0)]
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        p.wait()
    if failed:
        proc, log = failed[0]
        print(f"error: {shlex.join(proc.args)} exited with status {proc.returncode}; "
              f"see {log}", file=sys.stderr)
        sys.exit(proc.returncode)
    print(f"all {len(procs)} processes finished; logs: {logs[0].parent}", file=sys.stderr)
