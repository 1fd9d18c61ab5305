"""Config loading and the launch CLI: every bad input fails before compiling, with status 2."""

import dataclasses
from typing import Literal

import pytest
import yaml

from conftest import TINY_SFT_OVERRIDES, run_launch
from jaxrl.core.config import ConfigError, MeshConfig, build, parse_overrides
from jaxrl.core.mesh import mesh_shape


@dataclasses.dataclass
class Inner:
    size: int = 1
    kind: Literal["a", "b"] = "a"

    def validate(self):
        if self.size < 0:
            raise ConfigError(f"inner.size must be >= 0, got {self.size}.")


@dataclasses.dataclass
class Outer:
    name: str = "x"
    rate: float = 0.1
    inner: Inner = dataclasses.field(default_factory=Inner)
    tags: list[str] = dataclasses.field(default_factory=list)


def test_build_and_overrides():
    data = {"rate": 1, "inner": {"kind": "b"}, "tags": ["p", "q"]}
    cfg = build(Outer, data, source="t.yaml")
    assert cfg.rate == 1.0 and isinstance(cfg.rate, float)
    assert build(Outer, parse_overrides(["rate=3e-4"]), source="cli").rate == 3e-4
    assert cfg.inner == Inner(size=1, kind="b") and cfg.tags == ["p", "q"]
    typed = build(Outer, parse_overrides(["inner.size=3", "name=hello world", "rate=0.5"]),
                  source="cli")
    assert (typed.inner.size, typed.name, typed.rate) == (3, "hello world", 0.5)


@pytest.mark.parametrize("data, expected", [
    ({"inner": {"sise": 2}}, ["unknown key 'inner.sise'", "Did you mean 'inner.size'", "t.yaml"]),
    ({"rate": "fast"}, ["'rate' must be float", "'fast'"]),
    ({"inner": {"size": True}}, ["'inner.size' must be int"]),
    ({"inner": {"kind": "c"}}, ["'inner.kind' must be one of 'a', 'b'"]),
    ({"inner": {"size": -1}}, ["inner.size must be >= 0"]),
    ({"inner": 5}, ["'inner' must be a mapping"]),
])
def test_build_errors_name_the_key(data, expected):
    with pytest.raises(ConfigError) as err:
        build(Outer, data, source="t.yaml")
    for text in expected:
        assert text in str(err.value)


def test_mesh_must_tile_devices():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="do not divide the 8 devices"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(ConfigError, match="= 4 but there are 8 devices"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)


SFT = ["sft_gpt2_shakespeare", "data.path={corpus}"]  # a later data.path= overrides it


@pytest.mark.parametrize("args, expected", [
    ([*SFT, "loop.stepz=3"], "unknown key 'loop.stepz'. Did you mean 'loop.steps'"),
    ([*SFT, "data.batch_size=-4"], "data.batch_size must be >= 1"),
    ([*SFT, "loop.steps=many"], "'loop.steps' must be int"),
    ([*SFT, "mesh.data=3"], "= 3 but there are 8 devices"),
    ([*SFT, "data.path=nowhere/missing.txt"], "missing.txt"),
    (["configs/does_not_exist.yaml"], "not found"),
    ([*SFT, "run.wandb=onlin"], "Did you mean 'online'"),
])
def test_launch_config_errors_exit_2(args, expected, corpus, tmp_path):
    """No case needs the shared data: the data dir is an empty folder."""
    out = run_launch(*(a.format(corpus=corpus) for a in args),
                     env={"JAXRL_DATA_DIR": str(tmp_path / "empty")})
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_recipe_lists_choices(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"recipe": "sfft"}))
    out = run_launch(bad)
    assert out.returncode == 2
    assert "unknown recipe 'sfft'" in out.stderr and "Did you mean 'sft'" in out.stderr


def test_help_lists_recipes_and_configs():
    out = run_launch("--help")
    assert out.returncode == 0
    assert "sft " in out.stdout and "sft_gpt2_shakespeare" in out.stdout


def test_print_config_resolves_overrides(corpus):
    out = run_launch("sft_gpt2_shakespeare", f"data.path={corpus}", "loop.steps=7", "--print-config")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["loop"]["steps"] == 7 and cfg["recipe"] == "sft"
    assert cfg["run"]["dir"] == "runs/sft_gpt2_shakespeare"


def test_malformed_data_file_is_a_clear_error(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"text": oops}\n')
    out = run_launch("sft_gpt2_shakespeare", f"data.path={rows}", f"run.dir={tmp_path / 'run'}",
                     *TINY_SFT_OVERRIDES)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "rows.jsonl:2" in out.stderr
