"""``--at``: one parser (range-checked) for every command.

Its own small module so that ``escort explain`` need not import the PKI commands.
"""

from __future__ import annotations

import datetime as dt

from console.core import pki
from console.core.errors import InputError

AT_EARLIEST = dt.datetime(1950, 1, 1, tzinfo=dt.UTC)  # X.509 UTCTime starts here
AT_LATEST = dt.datetime(9998, 1, 1, tzinfo=dt.UTC)


def parse_time(text: str | None) -> dt.datetime:
    """RFC 3339 (``2026-11-26T12:00:00Z``; a bare date means midnight UTC) -> aware UTC."""
    if text is None:
        return dt.datetime.now(dt.UTC)
    try:
        value = pki.utc(dt.datetime.fromisoformat(text.strip()))
    except (ValueError, OverflowError) as exc:
        raise InputError(f"--at {text!r}: not an RFC 3339 time (e.g. 2026-11-26T12:00:00Z)") from exc
    # the ends of datetime's range overflow in date arithmetic (validity windows, CRL
    # ages); certificates and tokens cannot name times outside these years anyway
    if not AT_EARLIEST <= value <= AT_LATEST:
        raise InputError(f"--at {text!r}: outside the supported range "
                         f"{AT_EARLIEST:%Y-%m-%d} to {AT_LATEST:%Y-%m-%d}")
    return value


__all__ = ["AT_EARLIEST", "AT_LATEST", "parse_time"]
