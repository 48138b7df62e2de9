"""The feature matrix, computed from registered hook implementations and health."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel

from .plugins_manager import GPU, GPU_HOOKS, PluginManager

# (row label as in cedana-features.txt, hook name); None separates groups in the table. A row
# with no hook is a feature no pipeline has yet, so no plugin can implement it: • everywhere.
ROWS: tuple[tuple[str, str | None] | None, ...] = (
    ("Dump command", "cedana_dump_command"),
    ("Restore command", "cedana_restore_command"),
    ("Run command", "cedana_run_command"),
    ("Manage command", "cedana_manage_command"),
    ("Freeze command", "cedana_freeze_command"),
    ("Unfreeze command", "cedana_unfreeze_command"),
    ("Query command", "cedana_query_command"),
    ("Helper command(s)", "cedana_helper_commands"),
    None,
    ("Dump middleware", "cedana_dump_middleware"),
    ("Dump handler", "cedana_dump_handler"),
    ("Dump VM middleware", "cedana_dump_vm_middleware"),
    ("Dump VM handler", "cedana_dump_vm_handler"),
    ("Restore middleware", "cedana_restore_middleware"),
    ("Restore middleware (late)", "cedana_restore_middleware_late"),
    ("Restore handler", "cedana_restore_handler"),
    ("Restore VM middleware", "cedana_restore_vm_middleware"),
    ("Restore VM handler", "cedana_restore_vm_handler"),
    ("Freeze handler", "cedana_freeze_handler"),
    ("Unfreeze handler", "cedana_unfreeze_handler"),
    ("Live migration", "cedana_live_migration"),
    None,
    ("Run handler", None),  # one run handler serves both modes: see docs/plugins.md
    ("Run handler (serverless)", "cedana_run_handler_serverless"),
    ("Run middleware", "cedana_run_middleware"),
    ("Run middleware (late)", "cedana_run_middleware_late"),
    ("Manage handler", "cedana_manage_handler"),
    ("Custom kill signal", "cedana_kill_signal"),
    ("Custom stop check", "cedana_stopped"),
    ("Custom resume", "cedana_resume"),
    ("Custom cleanup", "cedana_cleanup"),
    ("Custom reaper", "cedana_reaper"),
    None,
    ("GPU interception", "cedana_gpu_interception"),
    ("GPU interception restore", "cedana_gpu_interception_restore"),
    ("GPU tracing", "cedana_gpu_tracing"),
    ("GPU tracing restore", "cedana_gpu_tracing_restore"),
    None,
    ("Checkpoint storage", "cedana_checkpoint_storage"),
    ("Query handler", "cedana_query_handler"),
    ("Health checks", "cedana_health_checks"),
)

# The columns we always show: ours and those of the system we model. Whether each
# is installed, and what it implements, is computed.
KNOWN_PLUGINS = (
    "process",
    "storage/local",
    "cloud-hypervisor",
    "runc",
    "containerd",
    "crio",
    "kata",
    "storage/cedana",
    "storage/s3",
    "storage/gcs",
    "k8s",
    "slurm",
    "gpu",
)


# Rows whose feature works only where another plugin works: GPU features need the GPU plugin,
# which implements them for every type that supports GPU jobs (see plugins_manager).
REQUIRES = dict.fromkeys(GPU_HOOKS, GPU)


class Status(StrEnum):
    implemented = "implemented"
    unimplemented = "unimplemented"
    not_installed = "not installed"
    incompatible = "incompatible"


SYMBOLS = {
    Status.implemented: "✔",
    Status.unimplemented: "•",
    Status.not_installed: "—",
    Status.incompatible: "✖",
}


class FeatureMatrix(BaseModel):
    plugins: list[str]
    features: dict[str, dict[str, Status]]
    errors: dict[str, list[str]]


def plugin_errors(pm: PluginManager, name: str) -> tuple[Status | None, list[str]]:
    """Why plugin ``name`` cannot work: (status that overrides its rows, reasons)."""
    if name in pm.failures:
        reason = pm.failures[name]
        kind = Status.incompatible if reason.startswith("incompatible") else Status.not_installed
        return kind, [reason]
    if pm.get_plugin(name) is None:
        return Status.not_installed, ["not installed: no plugin of this name is registered"]
    checks = pm.health_checks(name)
    failed = [f"health check {c.name}: {c.detail}" for c in checks if not c.ok]
    return (Status.incompatible if failed else None), failed


def _status(pm: PluginManager, name: str, hook: str | None, override: Status | None, required: Status | None) -> Status:
    implements = hook is not None and pm.implements(name, hook)
    if override is Status.not_installed:
        return override
    if override is Status.incompatible and (name in pm.failures or implements):
        return override
    if not implements:
        return Status.unimplemented
    return Status.incompatible if required and hook in REQUIRES else Status.implemented


def compute(pm: PluginManager) -> FeatureMatrix:
    names = list(KNOWN_PLUGINS) + [n for n in pm.plugin_names() if n not in KNOWN_PLUGINS]
    names += [n for n in pm.failures if n not in names]
    features: dict[str, dict[str, Status]] = {row[0]: {} for row in ROWS if row}
    errors: dict[str, list[str]] = {}
    health = {n: plugin_errors(pm, n) for n in {*names, *REQUIRES.values()}}
    for name in names:
        override, reasons = health[name]
        needed = [h for h in REQUIRES if REQUIRES[h] != name and pm.implements(name, h) and health[REQUIRES[h]][0]]
        required = health[REQUIRES[needed[0]]][0] if needed else None
        if needed:
            reasons = [*reasons, f"GPU features need the gpu plugin: {'; '.join(health['gpu'][1])}"]
        if reasons:
            errors[name] = reasons
        for row in ROWS:
            if row is not None:
                features[row[0]][name] = _status(pm, name, row[1], override, required)
    return FeatureMatrix(plugins=names, features=features, errors=errors)
