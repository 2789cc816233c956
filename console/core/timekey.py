"""Cache keys for time-dependent answers: exact at every boundary, shared in between.

Decisions are made at the real time (never a clock truncated to the minute: a grant
signed a moment ago must count at once). Recomputing every chain, policy and the
matrix for every new microsecond would make the console crawl, so answers are
cached under a *representative time* instead:

Every time-dependent check compares the decision time with a known set of instants —
certificate notBefore/notAfter (and notAfter minus the "expiring" window), CRL
thisUpdate/nextUpdate and revocation dates, token ``nbf`` (minus the clock-skew
allowance) and ``exp``. Between two consecutive instants every such comparison has
the same outcome, so any time in that open interval gives the same answer. The key
of ``at`` is ``at`` itself when it *is* one of the instants, else the interval's
first microsecond. The result computed at the key is the result at ``at``; it stays
valid until the next instant that matters, and no longer.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Iterable, Sequence

_TICK = dt.timedelta(microseconds=1)
#: The key for "no instant matters at all" (no certificates, no tokens).
_ANCHOR = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def boundaries(instants: Iterable[dt.datetime | None]) -> tuple[dt.datetime, ...]:
    """Sorted, de-duplicated, timezone-aware instants (``None`` skipped)."""
    out = {(t if t.tzinfo else t.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)
           for t in instants if t is not None}
    return tuple(sorted(out))


def time_key(events: Sequence[dt.datetime], at: dt.datetime) -> dt.datetime:
    """The representative time of ``at``'s interval between ``events`` (sorted)."""
    if not events:
        return _ANCHOR
    i = bisect.bisect_right(events, at)
    if i and events[i - 1] == at:
        return at
    if i == 0:
        return events[0] - _TICK
    key = events[i - 1] + _TICK
    if i < len(events) and key >= events[i]:
        return at  # two instants a microsecond apart: no room for a representative
    return key


def next_boundary(events: Sequence[dt.datetime], at: dt.datetime) -> dt.datetime | None:
    """The next instant after ``at`` at which an answer may change (None: never)."""
    i = bisect.bisect_right(events, at)
    return events[i] if i < len(events) else None


__all__ = ["boundaries", "next_boundary", "time_key"]
