"""lowbit's two Hydra plugins, registered with Hydra when ``lowbit.config`` is imported.

- ``RecipeSearchPath`` (a ``SearchPathPlugin``) appends the recipe folder of every package
  registered under the ``lowbit.recipes`` entry-point group, so a third party's ``recipe/``,
  ``model/``, ... YAML joins lowbit's own (``pkg://lowbit.recipes``, the primary config).
- ``PluginConfigSource`` (a ``ConfigSource``, scheme ``lowbit://``) serves the generated config
  of every installed plugin that ships no YAML: ``precision=nvfp4`` reads the constructor of the
  ``lowbit.precision`` entry point ``nvfp4`` (see ``Registry.default_config``). It sits last on
  the search path, so a YAML file of the same name wins. Listing a group reads entry-point
  metadata only; a plugin is imported when its config is loaded.

Hydra finds plugins in the ``hydra_plugins`` namespace package; lowbit registers these two
explicitly instead, from the module every process that composes a lowbit config imports.
"""

from __future__ import annotations

from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin

__all__ = ["PluginConfigSource", "RecipeSearchPath", "plugin_names", "register"]

SCHEME = "lowbit"


def _groups() -> dict[str, str]:
    from lowbit.registry import CONFIG_GROUPS

    return CONFIG_GROUPS


def plugin_names(group: str) -> list[str]:
    """Installed plugins a config group selects from (``precision`` -> the ``lowbit.precision`` entry points)."""
    from lowbit.registry import registry

    plugin_group = _groups().get(group)
    return registry.names(plugin_group) if plugin_group else []


class PluginConfigSource(ConfigSource):
    """``group/name`` -> the generated config of plugin ``name`` of the group's entry points."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _split(self, config_path: str) -> tuple[str, str]:
        group, _, name = self._normalize_file_name(config_path.strip("/")).removesuffix(".yaml").partition("/")
        return group, name

    def load_config(self, config_path: str) -> ConfigResult:
        from omegaconf import OmegaConf

        from lowbit.registry import registry

        group, name = self._split(config_path)
        node = OmegaConf.create(registry.default_config(_groups()[group], name))
        return ConfigResult(
            config=node, path=f"{SCHEME}://{self.path}", provider=self.provider, header={"package": None}
        )

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", *_groups())  # "": the root, which holds the groups

    def is_config(self, config_path: str) -> bool:
        group, name = self._split(config_path)
        return bool(name) and "/" not in name and name in plugin_names(group)

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        group = config_path.strip("/")
        if group == "":
            return sorted(_groups()) if results_filter in (None, ObjectType.GROUP) else []
        if group not in _groups() or results_filter == ObjectType.GROUP:
            return []
        return sorted(plugin_names(group))


class RecipeSearchPath(SearchPathPlugin):
    """Third-party recipe packages after lowbit's own, then the generated plugin configs."""

    def manipulate_search_path(self, search_path) -> None:
        from lowbit.config import recipe_packages

        for package in recipe_packages()[0][1:]:
            search_path.append(provider=f"lowbit.recipes:{package}", path=f"pkg://{package}")
        search_path.append(provider="lowbit.plugins", path=f"{SCHEME}://plugins")


def register() -> None:
    """Make both plugins known to Hydra in this process (idempotent)."""
    plugins = Plugins.instance()
    for clazz in (PluginConfigSource, RecipeSearchPath):
        plugins.register(clazz)
