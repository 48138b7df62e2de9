"""What is installed and whether it works: ``features``, ``plugin list`` and ``check``."""

from __future__ import annotations

import sys

import click

from ..engine import Engine
from ..features import ROWS, SYMBOLS, FeatureMatrix, compute, plugin_errors
from ..plugins_manager import get_plugin_manager
from .output import console, show, table


@click.command()
@click.option("--errors", is_flag=True, help="Say why plugins are incompatible or not installed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def features(errors: bool, as_json: bool) -> None:
    """The feature matrix, computed from the installed plugins."""
    m = compute(get_plugin_manager())
    doc = m.model_dump(mode="json", exclude=set() if errors else {"errors"})
    show(as_json, doc, lambda: _print_features(m, errors))


def _print_features(m: FeatureMatrix, errors: bool) -> None:
    from rich.table import Table

    t = Table("FEATURE", *(p.upper() for p in m.plugins), box=None, header_style="bold")
    for row in ROWS:
        if row is None:
            t.add_section()
            continue
        t.add_row(row[0], *(SYMBOLS[m.features[row[0]][p]] for p in m.plugins))
    console().print(t)
    console().print("✔ = implemented, • = unimplemented, — = not installed, ✖ = incompatible")
    if errors:
        for name, reasons in m.errors.items():
            for reason in reasons:
                console().print(f"{name}: {reason}", highlight=False, markup=False)  # `cedana-ray[gpu]` as written


@click.group()
def plugin() -> None:
    """Installed plugins."""


@plugin.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def plugin_list(as_json: bool) -> None:
    """List plugins with their status."""
    pm = get_plugin_manager()
    rows = []
    for name in sorted(set(pm.plugin_names()) | set(pm.failures)):
        status, reasons = plugin_errors(pm, name)
        module = getattr(pm.get_plugin(name), "__name__", "")
        rows.append({"name": name, "status": status.value if status else "ok", "module": module, "errors": reasons})
    show(
        as_json,
        rows,
        lambda: table(
            ("name", "status", "module", "errors"),
            [[r["name"], r["status"], r["module"], "; ".join(r["errors"])] for r in rows],
        ),
    )


@click.command()
@click.option("--full", is_flag=True, help="Also list every CRIU kernel feature.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def check(full: bool, as_json: bool) -> None:
    """Health of CRIU, the state dir, the store and every plugin."""
    from ..health import run_checks

    report = run_checks(Engine(), full)
    show(
        as_json,
        report,
        lambda: table(
            ("component", "check", "ok", "detail"),
            [
                [c["component"], c["name"], "✔" if c["ok"] else ("!" if not c["fatal"] else "✖"), c["detail"]]
                for c in report["checks"]
            ],
        ),
    )
    if not report["ok"]:
        sys.exit(1)
