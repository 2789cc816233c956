"""Errors a user can act on. ``str(err)`` is always one plain line."""

from __future__ import annotations


class EscortError(Exception):
    """Base for every error shown to a user (never with a traceback)."""

    exit_code = 1


class InputError(EscortError):
    """Unusable input: malformed file, wrong kind of file, too big, unknown field."""

    exit_code = 2


class ReadOnlyError(EscortError):
    """An action that changes something was asked for in read-only mode."""

    exit_code = 3


class ConnectionProblem(EscortError):
    """A host could not be reached or talked to (SSH, libvirt)."""

    exit_code = 4
