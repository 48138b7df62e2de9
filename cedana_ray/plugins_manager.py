"""The pluggy plugin manager: loading, validation and per-type hook calls.

Built-in and third-party plugins alike register through the ``cedana_ray.plugins``
entry point group; the entry point's name is the plugin's name. A plugin that
fails to import or whose hooks do not match their specs is not registered; the
reason is kept for ``features --errors``.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginNotFound, UsageError
from .models import HealthCheck

GROUP = "cedana_ray.plugins"


class PluginManager(pluggy.PluginManager):
    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.failures: dict[str, str] = {}  # plugin name -> why it is not registered

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
            self.failures[name] = f"incompatible: {exc}"

    def load_entry_points(self) -> None:
        for ep in entry_points(group=GROUP):
            try:
                plugin = ep.load()
            except Exception as exc:  # a plugin's import error must not break the CLI
                self.failures[ep.name] = f"not installed: import failed: {exc}"
                continue
            self.register_checked(plugin, ep.name)

    def plugin_names(self) -> list[str]:
        return sorted(n for n, _ in self.list_name_plugin())

    def implements(self, name: str, hook: str) -> bool:
        return any(i.plugin_name == name for i in getattr(self.hook, hook).get_hookimpls())

    def call_for(self, name: str, hook: str, **kwargs: Any) -> Any:
        """Call ``hook`` on plugin ``name`` only; None when it does not implement it."""
        if self.get_plugin(name) is None:
            raise PluginNotFound(
                f"no plugin for workload type {name!r}",
                hint=f"installed: {', '.join(self.plugin_names())}",
            )
        for impl in getattr(self.hook, hook).get_hookimpls():
            if impl.plugin_name == name:
                return impl.function(**kwargs)
        return None

    def health_checks(self, name: str) -> list[HealthCheck]:
        """Plugin ``name``'s health checks; one failed check if they raise (e.g. a dependency
        of the plugin that is not installed), so that `check` and `features` still answer."""
        try:
            return self.call_for(name, "cedana_health_checks") or []
        except Exception as exc:  # a plugin's error must not break the CLI
            return [HealthCheck(name=name, ok=False, fatal=False, detail=f"health checks failed: {exc!r}")]

    def require(self, name: str, hook: str, what: str, **kwargs: Any) -> Any:
        result = self.call_for(name, hook, **kwargs)
        if result is None:
            raise UsageError(f"{name} does not support {what}")
        return result


@functools.cache
def get_plugin_manager() -> PluginManager:
    """The installed plugins, loaded once; their storage schemes are known to fsspec from then on."""
    from .store import register_schemes

    pm = PluginManager()
    pm.load_entry_points()
    for schemes in pm.hook.cedana_checkpoint_storage():
        register_schemes(schemes)
    return pm
