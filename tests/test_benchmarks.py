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
    floors = json.loads((BENCH / "floors.json").read_text())[script]
    results = sorted((BENCH / "results").rglob(f"{script}.json"))
    assert BENCH / "results" / f"{script}.json" in results
    for path in results:
        ratios = json.loads(path.read_text()).get("ratios", {})
        assert sorted(set(floors) - set(ratios)) == [], path
        assert load_machine().check_floors(script, ratios) == 0, path
