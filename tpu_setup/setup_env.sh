#!/usr/bin/env bash
# Set up one TPU VM worker for jaxrl; run from the repository root on the worker.
# tpu_setup/setup_pod.py runs it on every worker at once. Safe to re-run.
#
# Makes .venv with Python 3.11 (tpu-ubuntu2204-base ships 3.10, jaxrl needs >= 3.11),
# installs jaxrl and JAX for TPU from PyPI (jax[tpu] pulls libtpu), then checks that JAX
# sees TPU devices. On a pod the check joins all workers through jax.distributed, so it
# only finishes when every worker runs it.
set -euo pipefail

PYTHON="${PYTHON:-python3.11}"

if ! command -v "$PYTHON" >/dev/null || ! dpkg -s "$PYTHON-venv" >/dev/null 2>&1; then
  sudo apt-get update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$PYTHON" "$PYTHON-venv"
fi
"$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e . "jax[tpu]"

.venv/bin/python - <<'PY'
import jax

jax.distributed.initialize()
devices = jax.devices()
assert devices[0].platform == "tpu", f"JAX found no TPU, only {devices}"
print(f"worker {jax.process_index()}/{jax.process_count()}: "
      f"{jax.local_device_count()} local, {jax.device_count()} total TPU devices")
PY
