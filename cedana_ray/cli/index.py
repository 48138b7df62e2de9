"""The command index: each command's name, short help and where it lives, so that the CLI
lists commands (``--help``) and runs one without importing the others or any plugin. It is
built once by importing everything (the core's command modules and every plugin) and kept
in the cache (:mod:`cedana_ray.cache`) with the modules that define the commands.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import click

from ..cache import cached

VM = "vm"  # the name the one VM type installed also goes by
ROOT = ""  # the root group's path: `cedana-ray ps`; the verb groups' are their names
CORE: dict[str, tuple[str, ...]] = {  # module:attribute of the core's commands, by group
    ROOT: (
        *("cedana_ray.cli.ps:ps", "cedana_ray.cli.jobs:job", "cedana_ray.cli.jobs:logs"),
        *("cedana_ray.cli.checkpoints:checkpoint", "cedana_ray.cli.history:events", "cedana_ray.cli.workload:wait"),
        *("cedana_ray.cli.inventory:features", "cedana_ray.cli.inventory:plugin", "cedana_ray.cli.inventory:check"),
        *(f"cedana_ray.cli.cluster:{name}" for name in ("up", "down", "nodes", "migrate", "drain")),
    ),
    "dump": ("cedana_ray.cli.jobs:dump_job",),
    "restore": ("cedana_ray.cli.jobs:restore_job",),
    "freeze": ("cedana_ray.cli.jobs:freeze_job",),
    "unfreeze": ("cedana_ray.cli.jobs:unfreeze_job",),
}
HOOKS = {  # the plugin hook that gives each group's commands
    ROOT: "cedana_helper_commands",
    "run": "cedana_run_command",
    "manage": "cedana_manage_command",
    "dump": "cedana_dump_command",
    "restore": "cedana_restore_command",
    "freeze": "cedana_freeze_command",
    "unfreeze": "cedana_unfreeze_command",
    "query": "cedana_query_command",
}


def _commands(found: Any) -> Iterator[click.Command]:
    """A hook's answer: one command, a list of them (helpers), or None."""
    for item in found if isinstance(found, list) else [found]:
        if isinstance(item, click.Command) and item.name:
            yield item


def _source(*modules: str) -> Iterable[str]:
    for name in modules:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:
            yield path


def _entry(cmd: click.Command, **where: Any) -> dict[str, Any]:
    return {"help": cmd.get_short_help_str(limit=1 << 16), **where}


def build() -> tuple[dict[str, Any], list[str]]:
    """Import every command, the core's and the installed plugins', and index them."""
    from ..plugins_manager import get_plugin_manager, installed, resolve

    commands: dict[str, dict[str, Any]] = {group: {} for group in HOOKS}
    files: set[str] = {__file__}  # how it indexes, too
    for group, targets in CORE.items():
        for target in targets:
            cmd = resolve(target)
            commands[group][cmd.name] = _entry(cmd, target=target)
            files.update(_source(target.partition(":")[0]))
    pm = get_plugin_manager()
    values = installed()
    for name in pm.plugin_names():
        for group, hook in HOOKS.items():
            for cmd in _commands(pm.call_for(name, hook)):
                commands[group].setdefault(cmd.name, _entry(cmd, plugin=name, target=values[name]))
                files.update(_source(values[name].partition(":")[0], cmd.callback.__module__ if cmd.callback else ""))
    alias_vm(commands, [name for name in pm.plugin_names() if pm.implements(name, "cedana_dump_vm_handler")])
    return commands, sorted(files)


def alias_vm(commands: dict[str, dict[str, Any]], vm_types: list[str]) -> None:
    """``run vm``, ``dump vm``...: the commands of the one VM type installed under the name
    ``vm`` too (with several, each goes by its own name only)."""
    if len(vm_types) != 1:
        return
    (vm_type,) = vm_types
    for group in commands.values():
        if (entry := group.get(vm_type)) and "plugin" in entry:
            help_ = f"{entry['help']} (the VM type installed: {vm_type})"
            group.setdefault(VM, {**entry, "help": help_, "name": vm_type})


@functools.cache
def index() -> dict[str, dict[str, Any]]:
    """Group -> command name -> its short help and where it lives."""
    return cached("commands", build)


def names(group: str) -> list[str]:
    return sorted(index().get(group, {}))


def short_help(group: str, name: str) -> str:
    return index()[group][name]["help"]


def load(group: str, name: str) -> click.Command | None:
    """Command ``name`` of ``group``, importing only the module it lives in (a plugin's
    command: that plugin)."""
    entry = index().get(group, {}).get(name)
    if entry is None:
        return None
    from ..plugins_manager import resolve  # here: importing it costs what --help saves

    found = resolve(entry["target"])
    if "plugin" in entry:
        found = getattr(found, HOOKS[group])()
    return next((c for c in _commands(found) if c.name == entry.get("name", name)), None)
