"""Decisions at the real time; cached answers keyed by interval, correct at every boundary."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from console.core import grants as gr
from console.core.envelope import NBF_SKEW
from console.core.timekey import boundaries, next_boundary, time_key
from console.services.fleet import FleetService
from tests.unit.trustkit import ANNE_KEY, T0, WEB_UUID, build_fleet

S = dt.timedelta(seconds=1)
US = dt.timedelta(microseconds=1)


def test_time_key_is_exact_at_instants_and_shared_between() -> None:
    a, b = T0, T0 + dt.timedelta(hours=1)
    ev = boundaries([b, a, None, a])
    assert ev == (a, b)
    assert time_key(ev, a) == a and time_key(ev, b) == b
    assert time_key(ev, a + S) == time_key(ev, a + 59 * S) == a + US
    assert time_key(ev, a - S) == a - US and time_key(ev, b + S) == b + US
    for t in (a - S, a, a + S, b - US, b, b + S):
        assert time_key(ev, time_key(ev, t)) == time_key(ev, t)  # idempotent
    assert next_boundary(ev, a) == b and next_boundary(ev, b) is None


def _answer(s: FleetService, at: dt.datetime) -> list[tuple[str, str, bool, tuple[str, ...]]]:
    out = []
    for vm in ("web-1", "db-1"):
        for host in ("hv-de-1", "hv-fr-1", "hv-us-1", "hv-de-old"):
            d = s.explain(vm, host, "anne", at)
            out.append((vm, host, d.allowed, tuple(sorted(r.code for r in d.reasons))))
    return out


def test_cached_answers_equal_exact_answers_around_every_boundary(tmp_path: Path) -> None:
    files = build_fleet(tmp_path)
    # a second grant that starts in a few seconds: its nbf (minus the skew) is a boundary too
    g = gr.build_grant_payload(owner=files.kit.alice.email, admin=gr.AdminRef("anne", ANNE_KEY),
                               vms=[WEB_UUID], not_before=T0 + 90 * S, not_after=T0 + 95 * S)
    token = gr.sign_grant(g, files.kit.alice.key, files.kit.alice.chain)
    (tmp_path / "grants" / "later.jws").write_text(token)
    eager = FleetService.load(files.fleet, eager=True)
    near = [T0 + 90 * S - NBF_SKEW, T0 + 95 * S, T0 + dt.timedelta(hours=8), T0 - dt.timedelta(hours=1)]
    _answer(eager, T0)
    assert all(t in eager._instant_set for t in near)  # noted as the answers were computed
    probes = sorted({t + d for t in near for d in (-S, -US, dt.timedelta(0), US, S, 30 * S)})
    random.Random(7).shuffle(probes)
    cached = FleetService.load_strict(files.fleet, eager=False)  # caches shared across times
    for at in probes + probes:  # the second pass answers from the caches
        fresh = FleetService.load_strict(files.fleet, eager=False)
        assert _answer(eager, at) == _answer(fresh, at) == _answer(cached, at), at


def test_a_grant_signed_a_moment_ago_counts_at_once(tmp_path: Path) -> None:
    """The 3 a.m. case: no waiting for the next minute; a signer's clock a little ahead is fine."""
    files = build_fleet(tmp_path)
    now = dt.datetime.now(dt.UTC)
    for name in (p.name for p in (tmp_path / "grants").iterdir()):
        (tmp_path / "grants" / name).unlink()
    g = gr.build_grant_payload(owner=files.kit.alice.email, admin=gr.AdminRef("anne", ANNE_KEY),
                               vms=[WEB_UUID], not_before=now + 20 * S, not_after=now + dt.timedelta(hours=1))
    token = gr.sign_grant(g, files.kit.alice.key, files.kit.alice.chain)
    (tmp_path / "grants" / "fresh.jws").write_text(token)
    for eager in (True, False):
        s = FleetService.load(files.fleet, eager=eager)
        codes = [r.code for r in s.explain("web-1", "hv-fr-1", "anne").reasons]
        assert "grant.not_yet_valid" not in codes, codes
    later = gr.build_grant_payload(owner=files.kit.alice.email, admin=gr.AdminRef("anne", ANNE_KEY),
                                   vms=[WEB_UUID], not_before=now + NBF_SKEW + 30 * S,
                                   not_after=now + dt.timedelta(hours=1))
    (tmp_path / "grants" / "fresh.jws").write_text(
        gr.sign_grant(later, files.kit.alice.key, files.kit.alice.chain))
    s = FleetService.load(files.fleet)
    assert "grant.not_yet_valid" in [r.code for r in s.explain("web-1", "hv-fr-1", "anne").reasons]
