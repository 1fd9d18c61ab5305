#!/usr/bin/env bash
# Set up a fresh machine and run every test: system tools, virtualenv, package, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Sandboxed graders need bubblewrap (bwrap) and Icarus Verilog; prlimit comes with util-linux.
missing=()
command -v bwrap >/dev/null || missing+=(bubblewrap)
command -v iverilog >/dev/null || missing+=(iverilog)
# The run browser's tests drive headless Chromium (Debian's build; nothing is downloaded at run time).
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && apt-get install -y -q "${missing[@]}"
  else
    sudo apt-get update -q && sudo apt-get install -y -q "${missing[@]}"
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch is pinned in the extra to the CPU wheel; never let pip pick a CUDA build.
.venv/bin/pip install -q -e ".[test,torch,rtl,classeval,view]"
# Two workers, one test file each at a time: tracing and compiling are single-threaded, so one
# pytest process leaves a core idle much of the time. `-n 0` runs in one process.
exec .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder "$@"
