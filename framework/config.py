"""Config composition: Hydra's compose API and override grammar over every recipe package.

``compose(["recipe=nvfp4_llm", "trainer.max_steps=50"])`` returns the run's DictConfig (struct
mode, so a typo in a key is an error, not a new key). Recipe packages are ``lowbit.recipes``
plus every package registered under the ``lowbit.recipes`` entry-point group, in that order.
``expand_sweeps`` turns ``-m`` overrides (``seed=1,2``) into one override list per job.
Every Hydra/OmegaConf failure becomes one ``LowbitError`` line.
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

from lowbit.errors import LowbitError
from lowbit.registry import CONFIG_GROUPS, registry

__all__ = ["Composed", "compose", "expand_sweeps", "list_recipes", "recipe_packages"]

PRIMARY = "lowbit.recipes"


@dataclass(frozen=True)
class Composed:
    """A composed run config and the group options that built it (``choices['recipe']``)."""

    cfg: DictConfig
    choices: dict[str, str | None]
    overrides: tuple[str, ...] = ()

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


def _one_line(err: Exception) -> str:
    text = str(err).strip().split("\nConfig search path:")[0]
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _group_options(loader: Any, group: str) -> list[str]:
    return sorted(loader.get_group_options(group))


def compose(overrides: Sequence[str] = ()) -> Composed:
    """Compose the primary config with ``overrides`` (Hydra grammar); one clear error on failure."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    user_overrides = tuple(overrides)
    packages, broken = recipe_packages()
    searchpath = "hydra.searchpath=[" + ",".join(f"pkg://{p}" for p in packages[1:]) + "]"
    overrides = [*overrides, searchpath]
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=PRIMARY, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups = set(loader.list_groups(""))
        generated: set[tuple[str, str]] = set()
        while True:
            try:
                cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
                break
            except MissingConfigException as err:
                match = re.search(r"Could not find '([^/']+)/([^']+)'", str(err))
                if not match:
                    raise LowbitError(_one_line(err)) from err
                group, option = match.groups()
                if (group, option) not in generated and _store_plugin_config(group, option):
                    generated.add((group, option))
                    continue  # the plugin ships no YAML: its generated config is in Hydra's ConfigStore now
                valid = ", ".join(sorted({*_group_options(loader, group), *_plugin_names(group)}))
                hint = f" (lowbit {group}s)" if group == "recipe" else " (lowbit plugins)"
                note = f"; note: {'; '.join(broken)}" if broken else ""
                raise LowbitError(f"unknown {group} '{option}'; valid: {valid}{hint}{note}") from err
            except OverrideParseException as err:
                raise LowbitError(f"bad override: {_one_line(err)}") from err
            except HydraException as err:
                cause = err.__cause__
                match = re.search(r"Could not override '([^']+)'", str(err))
                if match and isinstance(cause, OmegaConfBaseException):
                    raise LowbitError(_unknown_key_message(match.group(1), _selections(overrides, groups))) from err
                raise LowbitError(_one_line(err)) from err
            except OmegaConfBaseException as err:
                raise LowbitError(_one_line(err)) from err
        choices = dict(OmegaConf.to_container(cfg.hydra.runtime.choices))
    with open_dict(cfg):
        del cfg["hydra"]
    _check_types(cfg, overrides, groups)
    return Composed(cfg, choices, user_overrides)


def _plugin_names(group: str) -> list[str]:
    """Installed plugins a config group selects from (``precision`` -> the ``lowbit.precision`` entry points)."""
    return registry.names(CONFIG_GROUPS[group]) if group in CONFIG_GROUPS else []


def _store_plugin_config(group: str, option: str) -> bool:
    """Put the generated config of an installed plugin without YAML into Hydra's ConfigStore, so
    ``precision=NAME`` selects it like any other option; False when no such plugin is installed.
    A plugin that fails to import stops here with its own error (never "unknown")."""
    from hydra.core.config_store import ConfigStore

    if option not in _plugin_names(group):
        return False
    node = registry.default_config(CONFIG_GROUPS[group], option)
    ConfigStore.instance().store(group=group, name=option, node=node, provider="lowbit")
    return True


def _parse(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra.")])


def _selections(overrides: Sequence[str], groups: set[str]) -> list[str]:
    """The overrides that pick a group option (``recipe=...``, ``model=...``), not key values."""
    return [o.input_line for o in _parse(overrides) if o.key_or_group in groups]


def _unknown_key_message(key: str, selections: Sequence[str]) -> str:
    """Name the unknown key and the keys that do exist beside it."""
    parent, _, _ = key.rpartition(".")
    node = OmegaConf.select(compose(selections).cfg, parent) if parent else compose(selections).cfg
    valid = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "none"
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
        if new_name is not None and new_name != base[group].name and others and new_name in _plugin_names(group):
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
    """Hydra's basic sweeper: the cartesian product of every ``key=a,b`` / ``range()`` / ``choice()``."""
    from hydra.errors import OverrideParseException

    try:
        parsed = _parse(overrides)
    except OverrideParseException as err:
        raise LowbitError(f"bad override: {_one_line(err)}") from err
    axes = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
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
        raise LowbitError(f"{getattr(err, 'full_key', '?')}: {_one_line(err)}") from err
