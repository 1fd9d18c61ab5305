"""Overrides keep the recipe's defaults and are typed by their field (issue 13, part 1)."""

import dataclasses

import pytest

from jaxrl.core.config import ConfigError, build, merge, parse_overrides
from jaxrl.launch import load


def test_partial_model_section_keeps_the_recipe_preset(tmp_path):
    """`model.dropout=0.1` on a YAML with no `model:` must not turn the tiny preset into 124M."""
    path = tmp_path / "sft.yaml"
    path.write_text("recipe: sft\n")
    _, cfg = load(str(path), ["model.dropout=0.1"])
    _, plain = load(str(path), [])
    assert cfg.model.dropout == 0.1
    assert dataclasses.replace(cfg.model, dropout=plain.model.dropout) == plain.model
    assert (cfg.model.n_layer, cfg.model.n_embd) != (12, 768)  # not the class defaults


def test_one_optimizer_key_keeps_the_other_defaults(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text("recipe: reinforce\n")
    _, plain = load(str(path), [])
    _, cfg = load(str(path), ["optimizer.lr=1e-3"])
    assert cfg.optimizer.lr == 1e-3
    assert dataclasses.replace(cfg.optimizer, lr=plain.optimizer.lr) == plain.optimizer
    assert (plain.optimizer.warmup_steps, plain.optimizer.weight_decay) == (10, 0.0)


def test_yaml_then_command_line_over_the_defaults(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("recipe: sft\nmodel:\n  n_layer: 3\n")
    _, cfg = load(str(path), ["model.n_embd=64"])
    _, plain = load(str(tmp_path / "sft.yaml"), [])
    assert (cfg.model.n_layer, cfg.model.n_embd) == (3, 64)
    assert cfg.model.n_positions == plain.model.n_positions


def test_override_values_are_typed_by_the_field_not_yaml(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("recipe: ppo\n")
    _, cfg = load(str(path), ["run.dir=001", "loop.progress=off", "policy.hidden=[8, 4]",
                              "ppo.lr=3e-4", "env.name=CartPole-v1"])
    assert cfg.run.dir == "001"
    assert cfg.loop.progress is False
    assert cfg.policy.hidden == [8, 4]
    assert cfg.ppo.lr == 3e-4
    with pytest.raises(ConfigError, match=r"'run.wandb' must be one of .*got 'off'"):
        load(str(path), ["run.wandb=off"])
    with pytest.raises(ConfigError, match=r"'loop.steps' must be int, got 'ten'"):
        load(str(path), ["loop.steps=ten"])


@dataclasses.dataclass
class Section:
    size: int = 1

    def validate(self):
        if self.size < 0:
            raise ConfigError(f"section.size must be >= 0, got {self.size}.")


@dataclasses.dataclass
class Root:
    section: Section = dataclasses.field(default_factory=lambda: Section(size=-1))


def test_validate_runs_on_sections_that_are_not_set():
    with pytest.raises(ConfigError, match="section.size must be >= 0"):
        build(Root, {}, source="t.yaml")
    assert build(Root, merge({}, parse_overrides(["section.size=2"])), source="cli").section.size == 2
