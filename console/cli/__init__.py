"""The ``escort`` command. With no sub-command it opens the console.

Every ``EscortError`` becomes one line on stderr and its exit code; no tracebacks
reach users (set ESCORT_DEBUG=1 to see them).
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from typing import Any, NoReturn

import click

from console.core.errors import EscortError

#: Every module that adds commands, and which commands each adds. A command is
#: imported only when it runs (``escort explain`` need not import asyncssh, libvirt or
#: Textual: ~0.5-1 s of a one-pair answer on this machine). A name not listed here
#: imports every module first, so a module adding a command is never missed.
MODULES: dict[str, tuple[str, ...]] = {
    "pki_cmds": ("cert", "pki"),
    "fleet_cmds": ("explain", "targets", "policy", "grant"),
    "hosts_cmds": ("hosts",),
    "lab_cmds": ("lab",),
    "migrate_cmds": ("audit", "migrate"),
    "ui_cmds": ("demo",),
    "evacuate_cmds": ("evacuate", "drain"),
    "emergency_cmds": ("emergency",),
    "check_cmds": ("check",),
}
_loaded: set[str] = set()
#: Short one-pair answers: no cyclic garbage collection while they import and read (the
#: collector's ~90 passes over a growing heap found nothing and cost ~30-40 ms of a
#: 10,000-VM ``explain``); they re-enable it before contacting hosts (``fleet_cmds``).
NO_GC = frozenset({"explain", "targets"})


def finish(code: int, *, at_once: bool = True) -> NoReturn:
    """End a one-pair answer (``explain``/``targets``) with ``code``.

    When this process is the ``escort`` command itself (its ``__main__`` runs this
    ``main``; not a test or a program calling ``main``), it flushes its output and leaves
    at once: tearing the interpreter down -- a garbage collection over the answer's heap,
    every module and object freed one by one -- was ~50-80 ms of a 10,000-VM ``explain``
    here, and nothing is left to do then (files written are closed, helpers reaped).
    Anywhere else, and without ``at_once`` (an answer that contacted hosts: connection
    libraries may still hold threads or exit handlers), ``sys.exit(code)``. Output that
    cannot be flushed raises here, as it would from ``click.echo``, and the group reports
    it (a closed pipe: exit 0).
    """
    if at_once and getattr(sys.modules.get("__main__"), "main", None) is main:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _load(module: str, group: click.Group) -> None:
    if module not in _loaded:
        _loaded.add(module)
        importlib.import_module(f"console.cli.{module}").register(group)


class EscortGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        for module in MODULES:
            _load(module, self)
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in NO_GC and gc.isenabled():
            gc.disable()
            ctx.call_on_close(gc.enable)  # in-process callers (tests) get their collector back
        for module, names in MODULES.items():
            if cmd_name in names:
                _load(module, self)
        found = super().get_command(ctx, cmd_name)
        if found is None:
            for module in MODULES:
                _load(module, self)
            found = super().get_command(ctx, cmd_name)
        return found

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EscortError as exc:
            if os.environ.get("ESCORT_DEBUG"):
                raise
            click.echo(f"escort: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:  # `escort ... | head`: the reader left, nothing to say
            sys.stderr.close()
            ctx.exit(0)
        except OSError as exc:
            if os.environ.get("ESCORT_DEBUG"):
                raise
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            click.echo(f"escort: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug: still one line for the user, details on request
            if os.environ.get("ESCORT_DEBUG"):
                raise
            click.echo(f"escort: internal error ({type(exc).__name__}: {exc}); "
                       "run again with ESCORT_DEBUG=1 for details and report it", err=True)
            ctx.exit(70)


@click.group(cls=EscortGroup, invoke_without_command=True)
@click.option("--fleet", "fleet_file", type=click.Path(dir_okay=False), default=None,
              help="Fleet file (TOML) to open in the console.")
@click.option("--readonly", is_flag=True, help="Disable every action that changes anything.")
@click.option("--offline", is_flag=True,
              help="Console: contact no host; decide from the fleet file and local certificates.")
@click.version_option(package_name="escort")
@click.pass_context
def main(ctx: click.Context, fleet_file: str | None, readonly: bool, offline: bool) -> None:
    """escort: certificate-gated VM migration, from a terminal."""
    if ctx.invoked_subcommand is None:
        from console.cli.ui_cmds import open_console

        open_console(fleet_file, readonly=readonly, offline=offline)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
