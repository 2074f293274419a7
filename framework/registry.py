"""Plugin registry: entry-point discovery, lazy loading, API-version checks, building by name.

Every plugin kind is one entry-point group (``lowbit.posenc``, ``lowbit.precision``, ...).
Discovery reads distribution metadata only; a plugin's module is imported the first time
the plugin is asked for. A plugin that fails to import is recorded with its distribution,
version and error, and breaks only the runs that select it.

A plugin object (class, function, format object, or recipe package) declares the plugin API
it targets with an attribute ``lowbit_plugin_api = 1``.
"""

from __future__ import annotations

import collections.abc
import importlib
import importlib.metadata as md
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError

__all__ = [
    "CONFIG_GROUPS",
    "CONTEXT",
    "GROUPS",
    "PLUGIN_API",
    "PluginInfo",
    "Registry",
    "call_with_options",
    "registry",
]

PLUGIN_API = 1
GROUPS = ("formats", "precision", "posenc", "layers", "models", "data", "optimizers", "schedulers", "tasks", "recipes")
CONTEXT = {
    "precision": ("device_type",),
    "posenc": ("dim", "n_heads", "head_dim", "max_len", "grid"),
    "layers": ("f",),
    "models": ("posenc",),
    "data": ("seed",),
    "optimizers": ("model",),
    "schedulers": ("optimizer", "max_steps"),
    "tasks": ("model", "optimizer", "scheduler", "max_steps"),
}
"""Constructor arguments lowbit passes to a plugin of each group itself (not options a user sets)."""
CONFIG_GROUPS = {
    "precision": "precision",
    "posenc": "posenc",
    "model": "models",
    "data": "data",
    "optimizer": "optimizers",
    "scheduler": "schedulers",
    "task": "tasks",
}
"""Config groups (``precision=NAME``) and the plugin group each selects from."""


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
        installed = md.entry_points()  # every distribution's entry points, read once for all groups
        origins: dict[Any, tuple[str, str]] = {None: ("unknown", "unknown")}  # distribution -> (name, version)
        for group in GROUPS:
            for ep in installed.select(group=f"lowbit.{group}"):
                if ep.dist not in origins:  # one metadata parse per distribution (an object per distribution)
                    meta = ep.dist.metadata
                    origins[ep.dist] = (meta["Name"], meta["Version"])
                dist, version = origins[ep.dist]
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
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # any import failure (a sys.exit too) is the plugin's, never the run's
            reason = f"{type(err).__name__}: {_first_line(err)}"
            info.status = f"error: {reason}"
            raise LowbitError(f"{info.label} failed to import: {reason}") from err
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

    def default_config(self, group: str, name: str) -> dict[str, Any]:
        """The config of a plugin that ships no YAML: ``name`` and each constructor option with its
        default (a required option is ``???``, which the user must set; context keys excluded),
        updated by the plugin's ``config_defaults()`` classmethod where it has one."""
        factory = self.load(group, name)
        params, _ = _accepted_params(factory)
        config: dict[str, Any] = {"name": name}
        for key, param in params.items():
            if key in CONTEXT.get(group, ()) or param.kind not in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
                continue
            if param.default is param.empty:
                config[key] = "???"
            elif _yaml_value(param.default):
                config[key] = _config_value(param)
        extra = getattr(factory, "config_defaults", None)
        if callable(extra):  # options whose constructor default is a placeholder (None = the class's recipe)
            overrides = extra()
            config = {"name": name, **overrides, **{k: v for k, v in config.items() if k not in overrides}}
        return config

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
        try:
            return call_with_options(factory, f"{group} '{name}'", options, context)
        except LowbitError:
            raise
        except Exception as err:  # the plugin's constructor failed: name it in one line (--verbose: traceback)
            info = self.infos(group)[str(name)]
            raise LowbitError(f"{info.label} failed to construct: {type(err).__name__}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def _config_value(param: inspect.Parameter) -> Any:
    """A default as a config holds it: a tuple as a list, an int as a float where the annotation
    takes floats (so ``keep_last_blocks: int | float = 0`` accepts ``=0.15`` on the command line)."""
    value = param.default
    if isinstance(value, tuple):
        return list(value)
    if type(value) is int and "float" in str(param.annotation):
        return float(value)
    return value


def _yaml_value(value: Any) -> bool:
    """Whether a default can stand in a YAML config as it is."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_yaml_value(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _yaml_value(v) for k, v in value.items())
    return False


def _import_value(value: str) -> Any:
    module, _, attr = value.partition(":")
    obj = importlib.import_module(module.strip())
    for part in filter(None, attr.strip().split(".")):
        obj = getattr(obj, part)
    return obj


_BASE_INITS = ("object.__init__", "Module.__init__", "Precision.__init__")


def _forwards(fn: Any, kwargs_name: str) -> bool:
    """Whether ``__init__`` passes its ``**kwargs`` on to a base (``super().__init__(..., **kwargs)``)."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return re.search(rf"(?<!def )__init__\([^)]*\*\*{re.escape(kwargs_name)}\b", source) is not None


def _accepted_params(factory: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """(keyword parameters a factory names, whether it takes any keyword through ``**kwargs``).

    ``**kwargs`` passed on to a base's ``__init__`` accept that base's named parameters (followed up
    the MRO); ``**kwargs`` a constructor keeps for itself (or passes to ``object``, ``nn.Module``,
    Lightning's ``Precision``) accept any option."""
    classes = [c for c in factory.__mro__ if "__init__" in vars(c)] if inspect.isclass(factory) else []
    functions = [c.__init__ for c in classes] or [factory]
    params: dict[str, inspect.Parameter] = {}
    for i, fn in enumerate(functions):
        if classes and getattr(fn, "__qualname__", "") in _BASE_INITS:
            return params, i > 0  # reached through **kwargs: the plugin consumes them itself
        own = inspect.signature(fn).parameters
        params.update(
            {
                n: p
                for n, p in own.items()
                if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in params
            }
        )
        var_keyword = next((p.name for p in own.values() if p.kind is p.VAR_KEYWORD), None)
        if var_keyword is None:
            return params, False
        if not classes or not _forwards(fn, var_keyword):
            return params, True  # a function's or a constructor's own **kwargs take anything
    return params, True


def call_with_options(factory: Any, what: str, options: Mapping[str, Any], context: Mapping[str, Any]) -> Any:
    """Call ``factory(**context_it_accepts, **options)``; an unknown option is a clear error."""
    params, takes_any = _accepted_params(factory)
    valid = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in context]
    unknown = [k for k in options if k not in params and not takes_any]
    if unknown:
        raise LowbitError(f"{what} has no option '{unknown[0]}'; valid: {', '.join(valid) or 'none'}")
    _check_option_types(factory, what, options)
    kwargs = {k: v for k, v in context.items() if k in params}
    kwargs.update(options)
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in kwargs
    ]
    if missing:
        raise LowbitError(f"{what} needs option '{missing[0]}'")
    return factory(**kwargs)


def _check_option_types(factory: Any, what: str, options: Mapping[str, Any]) -> None:
    """Each option matches its constructor annotation where that is a plain type (bool, int, float,
    str, a Literal, a list or tuple, a mapping, or an Optional / union of those); an option a
    constructor passes on through ``**kwargs`` is checked against the base that names it."""
    import typing

    classes = [c for c in factory.__mro__ if "__init__" in vars(c)] if inspect.isclass(factory) else []
    hints: dict[str, Any] = {}
    for fn in [c.__init__ for c in classes] or [factory]:
        try:
            own = typing.get_type_hints(fn)
        except Exception:  # annotations that do not resolve here are the plugin's business
            own = {}
        hints = {**own, **hints}  # the subclass's own annotation wins
    for key, value in options.items():
        if key in hints and not _matches(value, hints[key]):
            raise LowbitError(f"{what} option '{key}' must be {_type_name(hints[key])}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, collections.abc.Mapping) or hint in (dict,):
        return isinstance(value, Mapping)
    return True  # classes, callables, tensors, ...: not checked


def _type_name(hint: Any) -> str:
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if args and origin is not None and origin not in (list, tuple, dict):
        return " or ".join(_type_name(a) for a in args)
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, names.get(origin, getattr(hint, "__name__", str(hint))))


registry = Registry()


def _resolve_formats_through_the_registry() -> None:
    """Format names in a spec beyond the built-ins (``hif8``, a third party's) resolve through the
    entry points: the numerics stay free of the registry, which plugs itself in here."""
    from lowbit.numerics import formats

    formats.set_format_resolver(lambda name: registry.load("formats", name), lambda: registry.names("formats"))


_resolve_formats_through_the_registry()
