"""The pluggy plugin manager: loading, validation and per-type hook calls.

Built-in and third-party plugins alike register through the ``cedana_ray.plugins``
entry point group; the entry point's name is the plugin's name. A plugin is imported
when it is first needed: a call for its type imports that plugin alone, a call to every
plugin (their storage schemes, the feature matrix) imports them all. The entry points
themselves are read once and kept in the cache (:mod:`cedana_ray.cache`). A plugin that
fails to import or whose hooks do not match their specs is not registered; the reason is
kept for ``features --errors``.

The GPU hooks are implemented once, by the ``gpu`` plugin, for every type whose plugin
supports GPU jobs (a ``supports_gpu`` attribute that is true, as :class:`cedana_ray.runtime.Runtime`
sets it): :meth:`PluginManager.call_for` answers them for such a type with the gpu plugin's
implementation, so that no runtime plugin needs to import the gpu plugin.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .cache import cached
from .errors import PluginNotFound, UsageError
from .extras import explain

if TYPE_CHECKING:
    from .models import HealthCheck

GROUP = "cedana_ray.plugins"
GPU = "gpu"
GPU_HOOKS = (
    "cedana_gpu_interception", "cedana_gpu_interception_restore", "cedana_gpu_tracing", "cedana_gpu_tracing_restore",
)  # fmt: skip


class PluginManager(pluggy.PluginManager):
    def __init__(self, entries: Mapping[str, str] | None = None) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self._failures: dict[str, str] = {}  # plugin name -> why it is not registered
        self._unloaded = dict(entries or {})  # plugin name -> entry point ("module:attr"), imported on first use

    @property
    def failures(self) -> dict[str, str]:
        self.load_all()
        return self._failures

    def register_checked(self, plugin: object, name: str) -> None:
        """Register ``plugin`` or record why it cannot be (wrong or unknown hook)."""
        try:
            self.register(plugin, name=name)
            unknown = [
                impl.function.__name__
                for hook in self.get_hookcallers(plugin) or []
                for impl in hook.get_hookimpls()
                if impl.plugin is plugin and not hook.has_spec()
            ]
            if unknown:
                self.unregister(plugin)
                raise pluggy.PluginValidationError(plugin, f"unknown hook(s): {', '.join(unknown)}")
        except (pluggy.PluginValidationError, ValueError) as exc:
            self._failures[name] = f"incompatible: {exc}"

    def load(self, name: str) -> None:
        """Import and register plugin ``name`` if it is installed and not yet loaded."""
        value = self._unloaded.pop(name, None)
        if value is None:
            return
        try:
            plugin = resolve(value)
        except Exception as exc:  # a plugin's import error must not break the CLI
            missing = explain(exc, f"the {name} plugin")  # an extra that is not installed
            self._failures[name] = f"not installed: {missing or f'import failed: {exc}'}"
            return
        self.register_checked(plugin, name)

    def load_all(self) -> None:
        for name in list(self._unloaded):
            self.load(name)

    def call_all(self, hook: str, **kwargs: Any) -> list[Any]:
        """``hook`` of every installed plugin."""
        self.load_all()
        return getattr(self.hook, hook)(**kwargs)

    def plugin_names(self) -> list[str]:
        self.load_all()
        return sorted(n for n, _ in self.list_name_plugin())

    def _impl(self, name: str, hook: str) -> pluggy.HookImpl | None:
        """Plugin ``name``'s own implementation of ``hook``."""
        self.load(name)
        return next((i for i in getattr(self.hook, hook).get_hookimpls() if i.plugin_name == name), None)

    def _answering(self, name: str, hook: str) -> pluggy.HookImpl | None:
        """What answers ``hook`` for type ``name``: its plugin's implementation, else, for a GPU
        hook of a type that supports GPU jobs, the gpu plugin's."""
        impl = self._impl(name, hook)
        if impl is None and hook in GPU_HOOKS and getattr(self.get_plugin(name), "supports_gpu", False):
            return self._impl(GPU, hook)
        return impl

    def implements(self, name: str, hook: str) -> bool:
        """Whether ``hook`` is answered for plugin ``name`` (by the gpu plugin for a GPU hook)."""
        return self._answering(name, hook) is not None

    def call_for(self, name: str, hook: str, **kwargs: Any) -> Any:
        """Call ``hook`` for plugin ``name`` only; None when nothing answers it for that plugin."""
        self.load(name)
        if self.get_plugin(name) is None:
            raise PluginNotFound(
                f"no plugin for workload type {name!r}",
                hint=f"installed: {', '.join(self.plugin_names())}",
            )
        impl = self._answering(name, hook)
        if impl is None:
            return None
        # through pluggy, on that one implementation: the spec's firstresult and argument names hold
        caller = self.subset_hook_caller(hook, remove_plugins=[p for p in self.get_plugins() if p is not impl.plugin])
        results = caller(**kwargs)
        if caller.spec and caller.spec.opts.get("firstresult"):
            return results
        return results[0] if results else None

    def health_checks(self, name: str) -> list[HealthCheck]:
        """Plugin ``name``'s health checks; one failed check if they raise (e.g. a dependency
        of the plugin that is not installed), so that `check` and `features` still answer."""
        try:
            return self.call_for(name, "cedana_health_checks") or []
        except Exception as exc:  # a plugin's error must not break the CLI
            from .models import HealthCheck  # here: the models cost `ps` more than it may take

            return [HealthCheck(name=name, ok=False, fatal=False, detail=f"health checks failed: {exc!r}")]

    def require(self, name: str, hook: str, what: str, **kwargs: Any) -> Any:
        result = self.call_for(name, hook, **kwargs)
        if result is None:
            raise UsageError(f"{name} does not support {what}")
        return result


def resolve(value: str) -> Any:
    """What an entry point's value (``module`` or ``module:attr``) names, imported."""
    module, _, attr = value.partition(":")
    found = importlib.import_module(module)
    return getattr(found, attr) if attr else found


def _survey() -> tuple[dict[str, Any], list[str]]:
    """The installed plugins' entry points and storage schemes (each scheme's class by its
    import path), read by importing every plugin; with the plugins' modules."""
    from importlib.metadata import entry_points  # only here: it reads every installed distribution

    found = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    pm = PluginManager(found)
    schemes = {
        scheme: cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        for provided in pm.call_all("cedana_checkpoint_storage")
        for scheme, cls in (provided or {}).items()
    }
    files = [getattr(sys.modules.get(v.partition(":")[0]), "__file__", None) for v in found.values()]
    return {"entry_points": found, "storage": schemes}, [f for f in files if f]


def installed() -> dict[str, str]:
    """The installed plugins: name -> entry point."""
    return cached("plugins", _survey)["entry_points"]


@functools.cache
def get_plugin_manager() -> PluginManager:
    """The installed plugins, each imported when first needed."""
    return PluginManager(installed())


@functools.cache
def register_storage() -> None:
    """Make every plugin's storage schemes known to fsspec, once, before a store is opened:
    by import path, so that no plugin is imported for it (fsspec imports a class when its
    scheme is first used)."""
    from .store import register_schemes

    register_schemes(cached("plugins", _survey)["storage"])
