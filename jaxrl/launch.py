"""python -m jaxrl.launch [CONFIG] [key.sub=value ...] [--print-config] [--help]

CONFIG is a YAML path or a name in configs/ (default: ppo_prospector, the quickstart); names
and `configs/NAME.yaml` work from any directory (the configs ship with jaxrl). The YAML's
`recipe:` key picks `jaxrl/recipes/<recipe>.py`, whose `Config` dataclass types every key.
Everything is checked before any device work: config problems exit with status 2 and say what
to change.
"""

from __future__ import annotations

import difflib
import importlib
import json
import pkgutil
import sys
from pathlib import Path

from jaxrl.core.config import (ConfigError, DistributedConfig, build, dump, merge, parse_overrides,
                               read_yaml)


def _config_dir() -> Path:
    """The configs `pip install .` puts inside the package, else a source checkout's configs/."""
    package = Path(__file__).resolve().parent
    return package / "configs" if (package / "configs").is_dir() else package.parent / "configs"


CONFIG_DIR = _config_dir()
DEFAULT_CONFIG = "ppo_prospector"  # the quickstart: ~1.5 min on 2 CPU cores


def recipe_names() -> list[str]:
    import jaxrl.recipes

    return sorted(m.name for m in pkgutil.iter_modules(jaxrl.recipes.__path__))


def load_recipe(name: str, source: str):
    names = recipe_names()
    if name not in names:
        guess = difflib.get_close_matches(str(name), names, n=1)
        hint = f" Did you mean '{guess[0]}'?" if guess else ""
        raise ConfigError(f"{source}: unknown recipe {name!r}.{hint} Valid recipes: "
                          f"{', '.join(names)}.")
    return importlib.import_module(f"jaxrl.recipes.{name}")


def resolve_path(arg: str) -> Path:
    """An existing path as given; NAME and a missing `configs/NAME.yaml` from CONFIG_DIR."""
    path = Path(arg)
    if path.exists():
        return path
    if path.suffix not in (".yaml", ".yml"):
        return CONFIG_DIR / f"{arg}.yaml"
    return CONFIG_DIR / path.name if path.parent == Path("configs") else path


def read_config(config_arg: str, overrides: list[str]) -> tuple[Path, dict]:
    """-> (config path, YAML merged with the command line), untyped. Touches no device."""
    path = resolve_path(config_arg)
    return path, merge(read_yaml(path), parse_overrides(overrides))


def load(config_arg: str, overrides: list[str]):
    """-> (recipe module, typed config) with run.dir resolved.

    Imports the recipe (and so its envs and models); call `init_distributed` first.
    """
    path, data = read_config(config_arg, overrides)
    if "recipe" not in data:
        manifest = (" It looks like a corpus manifest: run `python -m jaxrl.data process "
                    f"{path} --out DIR`." if "sources" in data else "")
        raise ConfigError(f"{path}: missing top-level key 'recipe' (one of: "
                          f"{', '.join(recipe_names())}).{manifest}")
    module = load_recipe(data["recipe"], str(path))
    cfg = build(module.Config, data, source=str(path))
    if not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / path.stem)
    return module, cfg


def distributed_config(path: Path, data: dict) -> DistributedConfig:
    """The `distributed:` section alone, typed and checked without importing any recipe."""
    return build(DistributedConfig, data.get("distributed") or {}, source=str(path),
                 prefix="distributed.")


def init_distributed(dist: DistributedConfig) -> None:
    """Start jax.distributed before anything touches a JAX backend (pods, clusters, local
    multi-process). Recipes, envs and models are imported only after this."""
    import jax

    if dist.local_device_count:
        jax.config.update("jax_num_cpu_devices", dist.local_device_count)
    timeouts = dict(heartbeat_timeout_seconds=dist.heartbeat_timeout_s,
                    initialization_timeout=dist.init_timeout_s)
    if dist.coordinator:
        jax.distributed.initialize(
            coordinator_address=dist.coordinator,
            num_processes=dist.num_processes,
            process_id=None if dist.process_id < 0 else dist.process_id,
            **timeouts,
        )
    elif dist.auto:
        jax.distributed.initialize(**timeouts)  # coordinator and ids from the cluster metadata


def check_processes(module, cfg) -> None:
    """A recipe that cannot run on several processes says so (`SINGLE_PROCESS = "why"`)."""
    import jax

    reason = getattr(module, "SINGLE_PROCESS", None)
    if reason and jax.process_count() > 1:
        raise ConfigError(f"recipe {cfg.recipe!r} runs in one process, but this job has "
                          f"{jax.process_count()}: {reason}.")


def check_seeds(module, cfg) -> None:
    """`run.seeds > 1` only where the recipe trains seeds side by side (`MULTI_SEED = True`)."""
    if cfg.run.seeds > 1 and not getattr(module, "MULTI_SEED", False):
        runners = [n for n in recipe_names() if getattr(load_recipe(n, "seeds"), "MULTI_SEED", False)]
        raise ConfigError(f"run.seeds={cfg.run.seeds}: recipe {cfg.recipe!r} trains one seed; "
                          f"set run.seeds=1 and vary run.seed, or use {', '.join(runners)}.")


def usage() -> str:
    lines = [__doc__.strip(), "", "Recipes:"]
    for name in recipe_names():
        doc = (importlib.import_module(f"jaxrl.recipes.{name}").__doc__ or "").strip()
        lines.append(f"  {name:<20} {doc.splitlines()[0] if doc else ''}")
    lines += ["", f"Configs ({CONFIG_DIR}):"]
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if "recipe" not in read_yaml(path):  # e.g. corpus manifests, run by `python -m jaxrl.data`
            continue
        first = path.read_text().splitlines()[:1]
        about = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        lines.append(f"  {path.stem:<28} {about}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    print_only = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    unknown_flags = [a for a in argv if a.startswith("--") and "=" not in a]
    if unknown_flags:
        print(f"error: unknown option {unknown_flags[0]}; see --help", file=sys.stderr)
        return 2
    positional = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    if len(positional) > 1:
        print(f"error: one CONFIG expected, got {positional}; overrides look like key=value",
              file=sys.stderr)
        return 2
    try:
        path, data = read_config(positional[0] if positional else DEFAULT_CONFIG, overrides)
        dist = distributed_config(path, data)
        if print_only:
            print(dump(load(str(path), overrides)[1]), end="")
            return 0
        init_distributed(dist)
        module, cfg = load(str(path), overrides)
        import jax

        from jaxrl.core.mesh import mesh_shape

        mesh_shape(cfg.mesh, jax.device_count())
        check_processes(module, cfg)
        check_seeds(module, cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return run(module, cfg)


def run(module, cfg) -> int:
    import jax

    from jaxrl.core.loop import NonFiniteError, Preempted
    from jaxrl.data.sources import DataError

    run_dir = Path(cfg.run.dir)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump(cfg))
    try:
        result = module.run(cfg)
    except Preempted as e:
        print(f"[jaxrl] {e}", flush=True)
        return 0
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0 and result is not None:
        (run_dir / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
