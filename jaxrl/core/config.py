"""Typed configs: YAML files and `a.b=value` overrides into dataclasses, checked before compiling.

A recipe declares `Config(RecipeConfig)` with nested dataclass sections. Each section starts
from the recipe's own default instance (its field's `default_factory`, e.g. a model preset),
then the YAML file's keys, then the command line's `a.b=value` keys, which are typed by their
field (never read as YAML). The build is strict: an unknown key, a wrong type or an invalid
value raises `ConfigError` naming the key, the file and the choices. Sections may define
`validate(self)`; it runs on every section, set or not.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem the user must fix; `jaxrl.launch` prints it and exits with status 2.

    Sections may also raise plain ValueError from `validate`/`__post_init__`; it is reported
    the same way, prefixed with the file and the section's key.
    """


@dataclasses.dataclass
class RunConfig:
    """Where outputs go and how the run is seeded."""

    dir: str = ""  # empty: runs/<config file stem>
    # Any path etils.epath takes (local, NFS, gs://...); empty: <dir>/checkpoints. With several
    # processes it must be one directory every process sees (checked at start-up).
    checkpoint_dir: str = ""
    seed: int = 0
    # Recipes that declare MULTI_SEED (ppo) train this many seeds at once, vmapped in one step;
    # each seed's curves are logged as seed<i>/<metric> beside their mean.
    seeds: int = 1
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    wandb_project: str = "jaxrl"
    # After SIGTERM/SIGHUP, a process that reaches no step boundary in this long (stuck in a
    # collective or a save) exits on its own, keeping the last complete checkpoint.
    preemption_grace_s: float = 120.0

    def validate(self):
        if self.seeds < 1:
            raise ConfigError(f"run.seeds must be >= 1, got {self.seeds}.")
        if self.preemption_grace_s <= 0:
            raise ConfigError(f"run.preemption_grace_s must be > 0, got {self.preemption_grace_s}.")


@dataclasses.dataclass
class MeshConfig:
    """Device mesh shape; -1 on one axis means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sizes.count(-1) > 1:
            raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1 (the rest).")
        if any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh: axis sizes must be positive or -1, got {sizes}.")


@dataclasses.dataclass
class LoopConfig:
    """Cadence of the shared train loop (all counts in steps; 0 disables)."""

    steps: int = 100
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    progress: bool = True
    # Batch-free (RL) steps run up to this many per compiled call (a lax.scan), never past a
    # log / eval / checkpoint point; 1 disables fusing. Preemption is checked between calls.
    max_fused_steps: int = 64

    def validate(self):
        if self.steps <= 0:
            raise ConfigError(f"loop.steps must be > 0, got {self.steps}.")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loop.{name} must be >= 0, got {getattr(self, name)}.")
        if self.max_fused_steps < 1:
            raise ConfigError(f"loop.max_fused_steps must be >= 1, got {self.max_fused_steps}.")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"loop.keep_checkpoints must be >= 1, got {self.keep_checkpoints}.")


@dataclasses.dataclass
class DistributedConfig:
    """Multi-host setup. On TPU pods leave empty: `jax.distributed.initialize()` auto-detects."""

    coordinator: str = ""  # "host:port" of process 0; enables jax.distributed
    num_processes: int = 1
    process_id: int = -1  # -1: read from the cluster environment
    auto: bool = False  # jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM)
    local_device_count: int = 0  # >0: fake this many CPU devices per process (tests, laptops)
    heartbeat_timeout_s: int = 100  # a peer silent this long ends the job with an error
    init_timeout_s: int = 300

    def validate(self):
        if self.num_processes < 1:
            raise ConfigError(f"distributed.num_processes must be >= 1, got {self.num_processes}.")
        if self.coordinator and ":" not in self.coordinator:
            raise ConfigError(
                f"distributed.coordinator must be 'host:port', got {self.coordinator!r}."
            )
        if self.process_id >= self.num_processes:
            raise ConfigError(
                f"distributed.process_id={self.process_id} must be < num_processes="
                f"{self.num_processes}."
            )


@dataclasses.dataclass
class RecipeConfig:
    """Sections every recipe has; recipes subclass this and add their own."""

    recipe: str = ""
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


class Override(str):
    """A command-line value: parsed by its field's type, never as YAML (`run.dir=001` stays "001")."""


def parse_overrides(items: list[str], source: str = "command line") -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> nested dict of `Override` strings; `build` types them by field."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"{source}: override {item!r} must look like key.sub=value.")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: override {item!r} conflicts with an earlier one.")
        node[parts[-1]] = Override(raw.strip())
    return out


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found. Pass a path like configs/<name>.yaml "
                          "(`python -m jaxrl.launch --help` lists them).")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections.")
    return data


def build(cls: type, data: dict, *, source: str, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from `data`, strictly, then run `validate()` on it.

    Every field starts from `base` (the default instance a parent section declares, e.g. a
    recipe's preset) or else the field's own default / `default_factory`; `data` overrides
    only the keys it names. Nested sections are built the same way whether set or not, so
    `validate()` runs on every section.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
                          f"got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        guess = difflib.get_close_matches(key, fields, n=1)
        hint = f" Did you mean '{prefix}{guess[0]}'?" if guess else ""
        raise ConfigError(f"{source}: unknown key '{prefix}{key}'.{hint} "
                          f"Valid keys here: {', '.join(sorted(fields))}.")
    kwargs = {}
    for name, f in fields.items():
        default = getattr(base, name) if base is not None else _field_default(f)
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            value = data.get(name, {})
            if value is None and _allows_none(hints[name]):
                kwargs[name] = None
                continue
            kwargs[name] = build(type(default), value, source=source, prefix=f"{prefix}{name}.",
                                 base=default)
        elif name in data:
            kwargs[name] = _coerce(hints[name], data[name], source, prefix + name)
        elif default is not dataclasses.MISSING:
            kwargs[name] = default
    section = prefix.rstrip(".") or "config"
    try:
        obj = cls(**kwargs)  # TypeError: a required field is missing
        if hasattr(obj, "validate"):
            obj.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {section}: {e}") from None
    return obj


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _allows_none(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _from_override(tp: Any, value: Override, source: str, key: str) -> Any:
    """Type a command-line string by its field: the string is what the user meant, not YAML."""
    def bad(what: str):
        return ConfigError(f"{source}: '{key}' must be {what}, got {str(value)!r}.")

    if tp is str or tp is Any:
        return str(value)
    if tp is bool:
        if value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise bad("true or false")
    if tp is int:
        try:
            return int(value)
        except ValueError:
            raise bad("int") from None
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise bad("float") from None
    if get_origin(tp) is Literal:
        for choice in get_args(tp):
            if str(choice) == value or (isinstance(choice, bool) and value.lower() in
                                        (_TRUE if choice else _FALSE)):
                return choice
        return _coerce(tp, str(value), source, key)  # the error lists the choices
    if get_origin(tp) in (typing.Union, types.UnionType):
        if type(None) in get_args(tp) and value.lower() in ("none", "null", "~", ""):
            return None
        errors = []
        for arg in (a for a in get_args(tp) if a is not type(None)):
            try:
                return _from_override(arg, value, source, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    try:  # lists, mappings: YAML flow syntax, `tags=[a, b]`
        parsed = yaml.safe_load(str(value))
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: '{key}': cannot parse {str(value)!r}: {e}") from None
    return _coerce(tp, parsed, source, key)


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(value, Override) and not dataclasses.is_dataclass(tp):
        return _from_override(tp, value, source, key)
    if dataclasses.is_dataclass(tp):
        return build(tp, value or {}, source=source, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            guess = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" Did you mean {guess[0]!r}?" if guess else ""
            raise ConfigError(f"{source}: '{key}' must be one of "
                              f"{', '.join(repr(a) for a in args)}; got {value!r}.{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}.")
        item = args[0] if args else Any
        items = [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {value!r} "
                              f"({type(value).__name__}).")
        return value
    raise ConfigError(f"{source}: '{key}' has an unsupported type {tp}.")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
