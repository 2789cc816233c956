"""``escort migrate`` and ``escort audit verify``."""

from __future__ import annotations

import json

import click

from console.core.errors import InputError


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit log."""


@audit_group.command("verify")
@click.argument("log_file", type=click.Path(dir_okay=True))
@click.option("--head", "expect_head", default=None,
              help="The head hash recorded earlier: also detects entries cut off the end.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def audit_verify(log_file: str, expect_head: str | None, as_json: bool) -> None:
    """Check every link of LOG_FILE. Exit 0 intact, 1 tampered (which line, what), 2 unusable."""
    from console.adapters.audit import verify_file

    if expect_head is not None and (len(expect_head) != 64 or
                                    any(c not in "0123456789abcdef" for c in expect_head)):
        raise InputError("--head must be a 64-character lowercase SHA-256 hex value")
    report = verify_file(log_file, expect_head=expect_head)
    if as_json:
        click.echo(json.dumps(report.as_json(), sort_keys=True))
    elif report.ok:
        click.echo(f"ok: {report.entries} entries, chain intact, head {report.head}")
    else:
        click.echo(f"TAMPERED: {len(report.problems)} problem(s) in {report.entries} entries")
        for problem in report.problems:
            click.echo(f"  {problem}  [{problem.code}]")
    if not report.ok:
        raise click.exceptions.Exit(1)


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(audit_group)
