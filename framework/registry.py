"""Plugin registry: entry-point discovery, lazy loading, API-version checks, building by name.

Every plugin kind is one entry-point group (``lowbit.posenc``, ``lowbit.precision``, ...).
Discovery reads distribution metadata only; a plugin's module is imported the first time
the plugin is asked for. A plugin that fails to import is recorded with its distribution,
version and error, and breaks only the runs that select it.

A plugin object (class, function, format object, or recipe package) declares the plugin API
it targets with an attribute ``lowbit_plugin_api = 1``.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError

__all__ = ["GROUPS", "PLUGIN_API", "PluginInfo", "Registry", "registry"]

PLUGIN_API = 1
GROUPS = ("formats", "precision", "posenc", "layers", "models", "data", "recipes")


@dataclass
class PluginInfo:
    """One entry point: where it comes from and whether it loaded."""

    group: str
    name: str
    value: str  # "package.module:attribute"
    dist: str
    version: str
    status: str = "not loaded"  # "ok", "not loaded", or "error: <why>"

    @property
    def label(self) -> str:
        return f"{self.group} plugin '{self.name}' ({self.dist} {self.version})"


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise LowbitError(f"unknown plugin group '{group}'; valid: {', '.join(GROUPS)}")


class Registry:
    """Entry-point backed registry; one process-wide instance is ``lowbit.registry.registry``."""

    def __init__(self) -> None:
        self._infos: dict[str, dict[str, PluginInfo]] | None = None
        self._loaded: dict[tuple[str, str], Any] = {}
        self._conflicts: dict[tuple[str, str], list[PluginInfo]] = {}

    # ---- discovery (metadata only) -------------------------------------------------------
    def refresh(self) -> None:
        """Forget what was discovered and loaded (after installing a distribution at run time)."""
        importlib.invalidate_caches()
        self._infos = None
        self._loaded.clear()
        self._conflicts.clear()

    def _discover(self) -> dict[str, dict[str, PluginInfo]]:
        if self._infos is not None:
            return self._infos
        infos: dict[str, dict[str, PluginInfo]] = {g: {} for g in GROUPS}
        for group in GROUPS:
            for ep in md.entry_points(group=f"lowbit.{group}"):
                dist = ep.dist.metadata["Name"] if ep.dist is not None else "unknown"
                version = ep.dist.version if ep.dist is not None else "unknown"
                info = PluginInfo(group, ep.name, ep.value, dist, version)
                seen = infos[group].get(ep.name)
                if seen is None:
                    infos[group][ep.name] = info
                elif seen.dist != dist:  # the same name from two distributions
                    self._conflicts.setdefault((group, ep.name), [seen]).append(info)
                # the same distribution seen twice on sys.path: the first one wins, as import does
        self._infos = infos
        return infos

    def infos(self, group: str) -> dict[str, PluginInfo]:
        """Entry points of one group, by name, without importing anything."""
        _check_group(group)
        return self._discover()[group]

    def names(self, group: str) -> list[str]:
        return sorted(self.infos(group))

    # ---- loading ---------------------------------------------------------------------------
    def load(self, group: str, name: str) -> Any:
        """Import a plugin (once) and check its API version; one clear error otherwise."""
        key = (group, name)
        if key in self._loaded:
            return self._loaded[key]
        infos = self.infos(group)
        if name not in infos:
            installed = ", ".join(sorted(infos)) or "none"
            raise LowbitError(f"unknown {group} '{name}'; installed: {installed} (lowbit plugins)")
        if key in self._conflicts:
            who = ", ".join(f"{i.dist} {i.version}" for i in self._conflicts[key])
            raise LowbitError(f"{group} '{name}' is provided by several distributions ({who}); uninstall all but one")
        info = infos[name]
        try:
            obj = _import_value(info.value)
        except Exception as err:  # any import failure is the plugin's, never the run's
            info.status = f"error: {type(err).__name__}: {err}"
            raise LowbitError(f"{info.label} failed to import: {type(err).__name__}: {err}") from err
        api = getattr(obj, "lowbit_plugin_api", None)
        if api != PLUGIN_API:
            what = "declares no lowbit_plugin_api" if api is None else f"targets plugin API {api}"
            info.status = f"error: {what}"
            raise LowbitError(f"{info.label} {what}; this lowbit provides plugin API {PLUGIN_API}")
        info.status = "ok"
        self._loaded[key] = obj
        return obj

    def status(self) -> list[PluginInfo]:
        """Try every plugin and return its info with the load status (for ``lowbit plugins``)."""
        rows = []
        for group in GROUPS:
            for name in self.names(group):
                try:
                    self.load(group, name)
                except LowbitError as err:
                    if (group, name) in self._conflicts:
                        self.infos(group)[name].status = f"error: {err}"
                rows.append(self.infos(group)[name])
        return rows

    # ---- building ----------------------------------------------------------------------------
    def build(self, group: str, spec: str | Mapping[str, Any], **context: Any) -> Any:
        """Build a plugin from a name or a mapping ``{name: ..., **options}``.

        ``context`` is what the caller knows (``dim``, ``n_heads``, ...): each plugin takes the
        keys its constructor names. ``options`` come from the user and must all be accepted.
        """
        if isinstance(spec, str):
            name, options = spec, {}
        elif isinstance(spec, Mapping):
            options = dict(spec)
            name = options.pop("name", None)
            if name is None:
                raise LowbitError(f"{group} config needs a 'name'; installed: {', '.join(self.names(group))}")
        else:
            raise LowbitError(f"{group} must be a name or a mapping with 'name', got {spec!r}")
        factory = self.load(group, str(name))
        return call_with_options(factory, f"{group} '{name}'", options, context)


def _import_value(value: str) -> Any:
    module, _, attr = value.partition(":")
    obj = importlib.import_module(module.strip())
    for part in filter(None, attr.strip().split(".")):
        obj = getattr(obj, part)
    return obj


def _accepted_params(factory: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """Keyword parameters a factory accepts; a class forwarding ``**kwargs`` to its base is followed up the MRO."""
    classes = [c for c in factory.__mro__ if "__init__" in vars(c)] if inspect.isclass(factory) else []
    functions = [c.__init__ for c in classes] or [factory]
    params: dict[str, inspect.Parameter] = {}
    for fn in functions:
        own = inspect.signature(fn).parameters
        params.update(
            {
                n: p
                for n, p in own.items()
                if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in params
            }
        )
        if not any(p.kind is p.VAR_KEYWORD for p in own.values()):
            return params, False
        if fn is getattr(object, "__init__", None) or getattr(fn, "__qualname__", "") in (
            "Module.__init__",
            "object.__init__",
        ):
            break
    return params, not classes  # a plain function with **kwargs takes anything


def call_with_options(factory: Any, what: str, options: Mapping[str, Any], context: Mapping[str, Any]) -> Any:
    """Call ``factory(**context_it_accepts, **options)``; an unknown option is a clear error."""
    params, takes_any = _accepted_params(factory)
    valid = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in context]
    unknown = [k for k in options if k not in params and not takes_any]
    if unknown:
        raise LowbitError(f"{what} has no option '{unknown[0]}'; valid: {', '.join(valid) or 'none'}")
    kwargs = {k: v for k, v in context.items() if k in params or takes_any}
    kwargs.update(options)
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in kwargs
    ]
    if missing:
        raise LowbitError(f"{what} needs option '{missing[0]}'")
    return factory(**kwargs)


registry = Registry()
