"""The start-up check's memos (issue 12, r3): each stores the result of the same function
for the same inputs, never a different answer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from console.core import policy as pol
from console.core.envelope import NBF_SKEW, Opened
from console.demo_scale import generate_scale
from console.services.fleet import FleetService

T = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _summary_unmemoised(p: pol.PlacementPolicy) -> str:
    parts = [f"{len(p.trusted_cas)} CA(s)"]
    for key in pol.REQUIRE_KEYS:
        values = getattr(p.requirements, key)
        if values:
            parts.append(f"{key} {('+' if key == 'policies' else '|').join(sorted(values))}")
    return ", ".join(parts)


def _policy(cas: int, **req: frozenset[str]) -> pol.PlacementPolicy:
    trusted = tuple(pol.TrustedCA(f"ca{i}", f"{i:064x}") for i in range(cas))
    return pol.PlacementPolicy("u", "n", "o", trusted, pol.Requirements(**req), T, T, "j")


def test_a_summary_is_the_one_of_its_own_ca_count_and_requirements() -> None:
    pol._SUMMARIES.clear()
    policies = [_policy(1, country=frozenset({"DE"})), _policy(2, country=frozenset({"DE"})),
                _policy(1, country=frozenset({"DE", "FR"})), _policy(1, locality=frozenset({"DE"})),
                _policy(1, policies=frozenset({"a", "b"})), _policy(1, org=frozenset({"a", "b"})),
                _policy(3)]
    for _ in range(2):  # the second round answers from the memo
        assert [p.summary() for p in policies] == [_summary_unmemoised(p) for p in policies]
    assert len({p.summary() for p in policies}) == len(policies)


class _Verifier:
    def __init__(self, payloads: dict[str, dict[str, object]]) -> None:
        self.payloads = payloads

    def open(self, token: str, typ: str, fields: frozenset[str]) -> Opened:
        return Opened(token, "d-" + token, typ, {}, self.payloads[token])


def test_token_windows_noted_once_per_window_give_every_instant() -> None:
    """Tokens sharing (nbf, exp) are noted once; a window that is not two plain ints (a bool
    equals 1, a float) never stands in for one that is."""
    stamp = int(T.timestamp())
    payloads: dict[str, dict[str, object]] = {
        "bool": {"nbf": True, "exp": stamp},
        "int": {"nbf": 1, "exp": stamp},
        "float": {"nbf": 7.0, "exp": stamp + 5},
        "same": {"nbf": 1, "exp": stamp},
        "other": {"nbf": stamp - 100, "exp": stamp + 100},
        "none": {},
    }
    memo = FleetService(None)
    for token in payloads:
        memo._note_token(token, "t", frozenset(), _Verifier(payloads))  # type: ignore[arg-type]
    plain = FleetService(None)
    for p in payloads.values():
        plain._note_window(p)
    assert memo._instant_set == plain._instant_set
    one = dt.datetime.fromtimestamp(1, dt.UTC)
    assert {one, one - NBF_SKEW, T} <= memo._instant_set


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return generate_scale(tmp_path / "f", vms=30, hosts=6, owners=3, rules=4)


def test_each_vms_check_holds_the_policy_result_its_row_shows(fleet: Path) -> None:
    """The start-up check asks ``_policy`` once per VM and hands that result to ``_vm_check``:
    it is the result ``_policy`` gives (with the memory), for the row and the matrix alike."""
    service = FleetService.load(fleet, eager=False)
    views = {v.uuid: v for step in service.check_in_steps() for v in step}
    at = service._matrix_at
    assert at is not None
    other = FleetService.load(fleet, eager=False)
    for rec in service._vms.values():
        check = service._vm_checks[service._vm_key(rec)][1]
        assert check.policy == service._policy(rec, at) == other._policy(other._vms[rec.uuid], at)
        assert views[rec.uuid].policy_summary == (check.policy.policy.summary() if check.policy.policy
                                                  else "no valid policy")
