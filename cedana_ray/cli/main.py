"""The ``cedana-ray`` command line. The only place errors become output and exit codes.

Commands are imported when they run, not before (see :mod:`.index`): ``--help`` and a
command's start cost what that command needs, not what every plugin does.
"""

from __future__ import annotations

import os
import sys

import click

from .. import __version__
from ..errors import CedanaError
from . import index

_debug = False


class LazyGroup(click.Group):
    """A group whose commands, the core's and the plugins' (from ``index.HOOKS[path]``:
    one command per plugin, or a list of them for ``cedana_helper_commands``), are listed
    from the command index and imported only when one is used."""

    def __init__(self, *args: object, path: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.path = path

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(index.names(self.path)))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or index.load(self.path, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        with formatter.section("Commands"):
            formatter.write_dl([(n, self._help(ctx, n, limit)) for n in names])

    def _help(self, ctx: click.Context, name: str, limit: int) -> str:
        """The command's short help, cut to ``limit`` as click cuts it, without importing it."""
        cmd = super().get_command(ctx, name) or click.Command(name, help=index.short_help(self.path, name))
        return cmd.get_short_help_str(limit)


def lazy_group(name: str, help: str) -> LazyGroup:
    return LazyGroup(name, path=name, help=help)


# the root group: the core's commands and the plugins' helper commands (`slurm setup`, `gpu trace`)
@click.group(cls=LazyGroup, path=index.ROOT, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cedana-ray")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
def cli(debug: bool) -> None:
    """Checkpoint/restore and migration of processes, containers and GPU jobs."""
    global _debug
    _debug = debug


for group in (
    lazy_group("run", "Run a workload under cedana-ray."),
    lazy_group("manage", "Adopt a workload started elsewhere."),
    lazy_group("dump", "Checkpoint a job or a workload."),
    lazy_group("restore", "Restore a job or a checkpoint."),
    lazy_group("freeze", "Pause a job or a workload."),
    lazy_group("unfreeze", "Resume a frozen job or workload."),
    lazy_group("query", "List the workloads of a runtime on this node."),
):
    cli.add_command(group)


def _safe(text: str) -> str:
    """``text`` without secrets (the values of ``--env``, keys, credentials; see
    cedana_ray.environment.redact): errors and tracebacks end up in logs and bug reports."""
    from ..environment import redact

    return redact(text, sys.argv[1:])


def _traceback() -> None:
    if _debug:
        import traceback

        sys.stderr.write(_safe(traceback.format_exc()))


def _error(message: str) -> None:
    from .output import error

    error(message)


def main() -> None:
    os.umask(0o077)  # what we write (images, manifests, logs, the registry) holds process memory: ours alone
    try:
        status = cli.main(standalone_mode=False)  # a command's ctx.exit(N) comes back as N
        sys.exit(status if isinstance(status, int) else 0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        _error("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.message = _safe(exc.message)
        exc.show()
        sys.exit(exc.exit_code)
    except CedanaError as exc:
        _traceback()
        _error(_safe(str(exc)))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the last resort: one line, traceback on --debug
        _traceback()
        _error(_safe(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)"))
        sys.exit(1)


if __name__ == "__main__":
    main()
