"""What a benchmark number was measured on: CPU model, the SIMD/matrix flags that change the
answer (AVX-512 BF16 and AMX decide whether bf16 is fast), cores, load, JAX backend.

    from machine import machine_info      # benchmarks/ is on sys.path when run as a script
    report["machine"] = machine_info()

Every benchmark's JSON carries this block, so a number is never read without its machine,
and a `"ratios"` block that `--check` compares with `floors.json` (`check_floors`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

FLOORS = Path(__file__).with_name("floors.json")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")

# The 1-minute load when the benchmark started (this module is imported first): the run's own
# work raises the load at the end, so only the start says whether other jobs shared the cores.
_LOAD_AT_START = os.getloadavg()[0]


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return model, flags


def machine_info() -> dict:
    """The machine block for a benchmark's JSON, with a note when other jobs held the cores."""
    import jax

    model, flags = _cpuinfo()
    info = {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpu_flags": {flag: flag in flags for flag in FLAGS},
        "amx": any(f.startswith("amx") for f in flags),
        "load_average_1m_at_start": round(_LOAD_AT_START, 2),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    if _LOAD_AT_START > 0.5:
        info["note"] = (f"shared machine: load {_LOAD_AT_START:.2f} from other jobs when this run "
                        "started; one run, not a median")
    return info


def floors_for(benchmark: str, machine: dict | None = None, floors_path: Path = FLOORS) -> dict:
    """`benchmark`'s floors, with the `"amx"` section's on a CPU with AMX: there torch's bf16
    runs on AMX tiles, a different peer from a CPU without them."""
    table = json.loads(floors_path.read_text())
    floors = dict(table.get(benchmark, {}))
    if machine and machine.get("amx"):
        floors.update(table.get("amx", {}).get(benchmark, {}))
    return floors


def check_floors(benchmark: str, ratios: dict, floors_path: Path = FLOORS, *,
                 machine: dict | None = None) -> int:
    """`--check`: 1 when a ratio is below its floor in floors.json (each one named on stderr).

    Floors sit below measured runs, so only a regression trips them; a ratio missing from
    `ratios` (its peer is not installed, its core not built) is not a failure. `machine`
    (the JSON's machine block) picks the AMX floors where they differ.
    """
    floors = floors_for(benchmark, machine, floors_path)
    failures = [f"{benchmark}: {k} = {ratios[k]:.3g} < floor {v}" for k, v in floors.items()
                if k in ratios and ratios[k] < v]
    for line in failures:
        print(f"below floor: {line}", file=sys.stderr)
    if not failures:
        print(f"{benchmark}: every ratio at or above its floor ({', '.join(sorted(floors)) or 'none set'})")
    return 1 if failures else 0
