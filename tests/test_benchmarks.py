"""The benchmarks' regression gate: `--check` against benchmarks/floors.json."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_machine():
    spec = importlib.util.spec_from_file_location("bench_machine", BENCH / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_floors_fails_only_below_a_floor(tmp_path, capsys):
    check = load_machine().check_floors
    floors = tmp_path / "floors.json"
    floors.write_text(json.dumps({"gpt2": {"train": 0.8, "decode": 1.2}}))
    assert check("gpt2", {"train": 0.9, "decode": 1.3}, floors) == 0
    assert check("gpt2", {"train": 0.9}, floors) == 0  # a peer that is not installed: no row
    assert check("gpt2", {"train": 0.7, "decode": 1.3}, floors) == 1
    assert "gpt2: train = 0.7 < floor 0.8" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["gpt2", "graders", "prospector", "ppo_peers", "ppo_throughput", "data"])
def test_every_benchmark_has_floors_and_a_check_flag(script):
    floors = json.loads((BENCH / "floors.json").read_text())
    text = (BENCH / f"{script}.py").read_text()
    assert floors.get(script) and '"--check"' in text and f'check_floors("{script}"' in text


@pytest.mark.parametrize("script", ["gpt2", "graders", "prospector", "ppo_peers", "ppo_throughput", "data"])
def test_committed_results_carry_every_floored_ratio_and_pass_it(script):
    """The README's numbers come from these files (`results/` for one machine, a subfolder per
    other machine): each must hold every ratio its floors name (a missing peer would hide a
    regression) and sit at or above each floor."""
    machine = load_machine()
    results = sorted((BENCH / "results").rglob(f"{script}.json"))
    assert BENCH / "results" / f"{script}.json" in results
    for path in results:
        report = json.loads(path.read_text())
        floors, ratios = machine.floors_for(script, report["machine"]), report.get("ratios", {})
        assert sorted(set(floors) - set(ratios)) == [], path
        assert machine.check_floors(script, ratios, machine=report["machine"]) == 0, path


def test_amx_floors_replace_the_ones_they_name(tmp_path):
    floors = tmp_path / "floors.json"
    floors.write_text(json.dumps({"gpt2": {"train": 0.8, "decode": 1.2}, "amx": {"gpt2": {"train": 0.4}}}))
    check = load_machine().check_floors
    assert check("gpt2", {"train": 0.5, "decode": 1.3}, floors, machine={"amx": True}) == 0
    assert check("gpt2", {"train": 0.5, "decode": 1.3}, floors, machine={"amx": False}) == 1
    assert check("gpt2", {"train": 0.5, "decode": 1.1}, floors, machine={"amx": True}) == 1


def test_a_peer_runs_in_its_own_process_and_a_missing_one_is_a_row(monkeypatch):
    """ppo_peers asks a fresh process for rejax's row (so it never runs under jaxrl's XLA
    flags); without rejax installed that row says how to install it instead of failing."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("rejax") is not None:
        pytest.skip("rejax is installed: its row would train for minutes")
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_ppo_peers", BENCH / "ppo_peers.py")
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    row = peers.in_own_process("rejax")
    assert "pip install -e .[bench]" in row["not_installed"]
    out = subprocess.run([sys.executable, str(BENCH / "ppo_peers.py"), "--peer", "sb3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice" in out.stderr
