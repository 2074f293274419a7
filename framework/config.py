"""Config composition: Hydra's config search path, override grammar and compose API.

``train`` is a Hydra application (``lowbit.cli``); ``compose(["recipe=nvfp4_llm",
"trainer.max_steps=50"])`` gives the same run config to library code and tests (struct mode, so
a typo in a key is an error, not a new key). Recipe packages are ``lowbit.recipes`` (the primary
config) plus every package registered under the ``lowbit.recipes`` entry-point group; plugins
without YAML get generated configs (``lowbit.hydra_plugins``). ``expand_sweeps`` turns ``-m``
overrides (``seed=1,2``) into one override list per job, so every job is checked before any
runs. Every Hydra/OmegaConf failure becomes one ``LowbitError`` line.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from lowbit import hydra_plugins
from lowbit.errors import LowbitError
from lowbit.registry import CONFIG_GROUPS, registry
from lowbit.validate import check_config

__all__ = [
    "Composed",
    "compose",
    "expand_sweeps",
    "hydra_error",
    "list_recipes",
    "one_line",
    "recipe_packages",
    "run_name",
]

PRIMARY = "lowbit.recipes"


def run_name(*, _root_: DictConfig) -> str:
    """``<recipe>-<precision>-<seed>`` (the model's name when no recipe is chosen): the default
    ``name`` of a run, its W&B run name and its folder under ``runs/``."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    first = choices.get("recipe") or OmegaConf.select(_root_, "model.name", default="run")
    precision = OmegaConf.select(_root_, "precision.name", default=None) or choices.get("precision")
    return "-".join(str(part) for part in (first, precision, OmegaConf.select(_root_, "seed")) if part is not None)


OmegaConf.register_new_resolver("lowbit.run_name", run_name, replace=True)
hydra_plugins.register()


@dataclass(frozen=True)
class Composed:
    """A composed run config and the group options that built it (``choices['recipe']``)."""

    cfg: DictConfig
    choices: dict[str, str | None]
    overrides: tuple[str, ...] = ()
    run_dir: Path | None = None  # Hydra's output directory (hydra.run.dir, or the sweep job's)
    hydra: DictConfig | None = None  # Hydra's own config of the job, where composed by compose()

    @property
    def recipe(self) -> str | None:
        return self.choices.get("recipe")


def recipe_packages() -> tuple[list[str], list[str]]:
    """(importable recipe packages, one-line notes about broken ones); lowbit's own first."""
    packages, broken = [PRIMARY], []
    for name in registry.names("recipes"):
        try:
            module = registry.load("recipes", name)
        except LowbitError as err:
            broken.append(str(err))
            continue
        if module.__name__ != PRIMARY:
            packages.append(module.__name__)
    return packages, broken


def _package_dir(package: str) -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files(package)))


def list_recipes() -> list[tuple[str, str, str]]:
    """(name, description, package) for every recipe in every recipe package, sorted by name."""
    rows = {}
    for package in recipe_packages()[0]:
        for path in sorted((_package_dir(package) / "recipe").glob("*.yaml")):
            if path.stem not in rows:  # the first package on the search path wins, as in Hydra
                data = yaml.safe_load(path.read_text()) or {}
                rows[path.stem] = (path.stem, str(data.get("description", "")).strip(), package)
    return [rows[k] for k in sorted(rows)]


def one_line(err: Exception) -> str:
    text = str(err).strip().split("\nConfig search path:")[0]
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _group_options(loader: Any, group: str) -> list[str]:
    return sorted(loader.get_group_options(group))


def compose(overrides: Sequence[str] = ()) -> Composed:
    """Compose the primary config with ``overrides`` (Hydra grammar); one clear error on failure.

    The library's way to the config ``train`` builds (Hydra's compose API, same search path and
    plugins); ``hydra.*`` overrides apply too, so ``hydra.run.dir=X`` sets the run directory."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    user_overrides = tuple(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=PRIMARY, version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            groups = set(loader.list_groups(""))
            try:
                cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
            except Exception as err:
                raise hydra_error(err, overrides, loader) from err
    finally:
        GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)  # ${name} and hydra.run.dir read the choices from it
    choices = dict(OmegaConf.to_container(cfg.hydra.runtime.choices))
    run_dir = Path(str(cfg.hydra.run.dir))
    hydra = OmegaConf.create(OmegaConf.to_container(cfg.hydra))
    with open_dict(cfg):
        del cfg["hydra"]
    _check_types(cfg, overrides, groups)
    check_config(cfg)
    return Composed(cfg, choices, user_overrides, run_dir, hydra)


def hydra_error(err: Exception, overrides: Sequence[str], loader: Any = None) -> Exception:
    """One ``LowbitError`` line for an error Hydra or OmegaConf raised while composing ``overrides``:
    an unknown option lists the valid ones, an unknown key the keys beside it; anything else
    (a LowbitError from a plugin's config, say) is returned unchanged."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    cause = err
    while cause is not None and not isinstance(cause, LowbitError):
        cause = cause.__cause__
    if cause is not None:
        return cause
    if isinstance(err, MissingConfigException):
        match = re.search(r"Could not (?:find|load) '([^']+)/([^/']+)'", str(err))
        if not match or loader is None:
            return LowbitError(one_line(err))
        group, option = match.groups()
        valid = ", ".join(_group_options(loader, group))  # YAML files and installed plugins alike
        hint = {"recipe": " (lowbit recipes)", **dict.fromkeys(CONFIG_GROUPS, " (lowbit plugins)")}.get(group, "")
        broken = recipe_packages()[1]
        note = f"; note: {'; '.join(broken)}" if broken else ""
        return LowbitError(f"unknown {group} '{option}'; valid: {valid}{hint}{note}")
    if isinstance(err, OverrideParseException):
        return LowbitError(f"bad override: {one_line(err)}")
    if isinstance(err, HydraException):
        match = re.search(r"Could not override '([^']+)'", str(err))
        if match and isinstance(err.__cause__, OmegaConfBaseException) and loader is not None:
            groups = set(loader.list_groups(""))
            # a dict value merged into a dict names the new key inside it (model.kwargs={a: 1}: model.kwargs.a)
            full_key = getattr(err.__cause__, "full_key", None) or match.group(1)
            key = full_key if full_key.startswith(match.group(1)) else match.group(1)
            return LowbitError(_unknown_key_message(key, _selections(overrides, groups)))
        return LowbitError(one_line(err))
    if isinstance(err, OmegaConfBaseException):
        return LowbitError(one_line(err))
    return err


def _parse(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([o for o in overrides if not o.lstrip("+~").startswith("hydra")])


def _selections(overrides: Sequence[str], groups: set[str]) -> list[str]:
    """The overrides that pick a group option (``recipe=...``, ``model=...``), not key values."""
    return [o.input_line for o in _parse(overrides) if o.key_or_group in groups]


def _unknown_key_message(key: str, selections: Sequence[str]) -> str:
    """Name the unknown key and the keys that do exist beside it."""
    parent, _, _ = key.rpartition(".")
    cfg = compose(selections).cfg
    node = OmegaConf.select(cfg, parent) if parent else cfg
    valid = (", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "") or "none"
    where = f" under '{parent}'" if parent else ""
    return f"unknown config key '{key}'; valid keys{where}: {valid} (use +{key}=VALUE to add a new key)"


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _check_types(cfg: DictConfig, overrides: Sequence[str], groups: set[str]) -> None:
    """An override must keep the type of the value it replaces (an int stays an int, ...)."""
    parsed = _parse(overrides)
    key_overrides = [o for o in parsed if o.key_or_group not in groups and not o.is_add() and not o.is_delete()]
    if not key_overrides:
        return
    base = compose([o.input_line for o in parsed if o.key_or_group in groups]).cfg
    for o in key_overrides:
        group, _, key = o.key_or_group.partition(".")
        new_name = OmegaConf.select(cfg, o.key_or_group) if key == "name" and group in CONFIG_GROUPS else None
        others = ", ".join(k for k in base[group] if k != "name") if new_name is not None else ""
        if (
            new_name is not None
            and new_name != base[group].name
            and others
            and new_name in hydra_plugins.plugin_names(group)
        ):
            raise LowbitError(
                f"{o.key_or_group}={new_name} would keep {base[group].name}'s options ({others}); "
                f"select the plugin with {group}={new_name}"
            )
        default = OmegaConf.select(base, o.key_or_group, default=None, throw_on_missing=False)
        value = OmegaConf.select(cfg, o.key_or_group, default=None, throw_on_missing=False)
        if default is None or value is None:
            continue
        if not _same_kind(default, value):
            what = _TYPE_NAMES.get(type(default), "a list" if isinstance(default, ListConfig) else "a mapping")
            raise LowbitError(f"{o.key_or_group} must be {what} (default {default!r}), got {value!r}")


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, DictConfig):
        return isinstance(value, DictConfig)
    if isinstance(default, ListConfig):
        return isinstance(value, ListConfig)
    return True  # strings take what the user writes


def expand_sweeps(overrides: Sequence[str]) -> list[list[str]]:
    """Hydra's basic sweeper: the cartesian product of every ``key=a,b``, ``range()``, ``choice()``
    and ``glob()`` (over the group's options). A continuous sweep (``interval()``, for a sweeper
    such as Optuna) is left out: the jobs keep the key's configured value."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=PRIMARY, version_base="1.3"):
            parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
            try:
                parsed = parser.parse_overrides([o for o in overrides if not o.lstrip("+~").startswith("hydra")])
            except OverrideParseException as err:
                raise LowbitError(f"bad override: {one_line(err)}") from err
            axes = [[o] for o in overrides if o.lstrip("+~").startswith("hydra")]
            for o in parsed:
                if not o.is_sweep_override():
                    axes.append([o.input_line])
                elif o.is_discrete_sweep():
                    prefix = o.get_key_element()
                    axes.append([f"{prefix}={v}" for v in o.sweep_string_iterator()])
    finally:
        GlobalHydra.instance().clear()
    return [list(job) for job in itertools.product(*axes)]


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what each run saves as ``config.yaml``)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def plain(node: Any) -> Any:
    """A resolved config node as plain Python (dict/list/scalars), for building objects.

    An interpolation that cannot resolve (``model=vit`` with text data has no ``data.image_size``)
    is one clear error naming the key."""
    from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError

    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except InterpolationKeyError as err:
        key, missing = getattr(err, "full_key", "?"), err.msg.splitlines()[0]
        raise LowbitError(
            f"{key} cannot be set: {missing}; pick components that fit together "
            "(e.g. model=vit needs image data such as data=digits, model=gpt text data)"
        ) from err
    except InterpolationResolutionError as err:
        raise LowbitError(f"{getattr(err, 'full_key', '?')}: {one_line(err)}") from err
