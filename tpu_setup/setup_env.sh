#!/usr/bin/env bash
# Install jaxrl on one TPU VM worker; run from the repository root on the worker.
# launch/tpu_pod.py runs it on every worker after each deploy, tpu_setup/setup_pod.py once
# (then checks the TPUs). Safe to re-run.
#
# Makes .venv with Python 3.11 if missing (tpu-ubuntu2204-base ships 3.10, jaxrl needs >= 3.11),
# installs the exact versions in tpu_setup/requirements.txt (JAX for TPU included: jax[tpu]
# pulls libtpu), so every worker runs the same libraries as the tested venv, then jaxrl itself
# (editable, which builds the Prospector C++ core in place).
set -euo pipefail

PYTHON="${PYTHON:-python3.11}"

if [ ! -x .venv/bin/python ]; then
  if ! command -v "$PYTHON" >/dev/null || ! dpkg -s "$PYTHON-venv" >/dev/null 2>&1; then
    sudo apt-get update -q
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$PYTHON" "$PYTHON-venv"
  fi
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q -r tpu_setup/requirements.txt
.venv/bin/pip install -q --no-deps --no-build-isolation -e .
