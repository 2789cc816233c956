"""The start-up check's memos (issue 12, r3): each stores the result of the same function
for the same inputs, never a different answer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from console.core import policy as pol
from console.core.decisions import VMCheck
from console.core.envelope import NBF_SKEW, Opened
from console.demo_scale import generate_scale
from console.services.fleet import FleetService
from tests.unit.scalekit import helper_messages

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


def test_the_helpers_opened_tokens_count_only_for_the_consoles_own_tokens(fleet: Path) -> None:
    """The helper names each token it opened by its digest. The console adopts an opened
    result only under the digest of a token it holds: a policy that changed after the helper
    opened it (here: one whose signature was damaged) is opened by the console itself and
    refused; nothing opened for the old token is used for it. The helper is played over a
    real pipe with what ``_prefetch_main`` sent for the files before the change."""
    import multiprocessing
    import threading

    from console.core.envelope import TYP_POLICY, token_digest

    messages = helper_messages(fleet)
    spec = FleetService.load(fleet, eager=False).spec  # (the policy files' paths)
    assert [m[0] for m in messages][:2] == ["tokens", "hosts"] and messages[-1] == ("done",)
    assert all(type(p) is tuple and len(p) == 4 for m in messages if m[0] == "opened" for p in m[1])
    first = sorted((fleet.parent / "policies").iterdir())[0]
    old = first.read_text().strip()
    head, payload, sig = old.split(".")
    new = f"{head}.{payload}.{('B' if sig[0] != 'B' else 'C') + sig[1:]}"
    first.write_text(new)
    tokens = [Path(v.policy_file).read_text().strip() for v in spec.vms] if spec else []
    assert new in tokens and old not in tokens
    messages[0] = ("tokens", "", False, tokens)  # the files as the console reads them now

    console = FleetService.load(fleet, eager=False)
    receive, send = multiprocessing.Pipe(duplex=False)
    console._prefetch = (None, receive)  # type: ignore[assignment]
    def play() -> None:
        for m in messages:
            send.send(m)

    sender = threading.Thread(target=play)
    sender.start()
    views = {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
             for step in console.check_in_steps() for v in step}
    sender.join()
    assert console.check_source == "computed"
    opened = console._policies.envelopes._opened
    assert (token_digest(old), TYP_POLICY) not in opened
    assert opened[(token_digest(new), TYP_POLICY)].payload is None  # opened here: not the helper's
    plain = FleetService.load(fleet, eager=False)
    assert views == {v.uuid: (v.owner, v.allowed_targets, v.policy_summary,
                              [r.code for r in v.policy_problems])
                     for step in plain.check_in_steps() for v in step}
    assert any("policy.signature" in v[3] for v in views.values())


@pytest.mark.parametrize("group", [1, 3, 64])
def test_a_snapshots_checks_come_back_group_by_group_as_they_were(fleet: Path, group: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``_capture`` pickles the VMs' full checks in groups; a warm start unpickles a VM's group
    when the VM is first asked about and adopts the group's other VMs with it: every VM's
    policy result and check are then exactly those of a check without any snapshot, and each
    group is unpickled once."""
    from console.adapters.cache import FleetSnapshot
    from console.services import fleet as svc

    monkeypatch.setattr(svc, "CHECK_GROUP", group)
    cold = FleetService.load(fleet, eager=False)
    cold.use_cache = True
    for _ in cold.check_in_steps():
        pass
    assert cold.check_source == "computed"
    warm = FleetService.load(fleet, eager=False)
    warm.use_cache = True
    for _ in warm.check_in_steps():
        pass
    assert warm.check_source == "snapshot"
    loads: list[int] = []
    real = FleetSnapshot.loads

    def counted(blob: bytes | memoryview) -> object:
        got = real(blob)
        if isinstance(got, tuple) and got and all(isinstance(c, VMCheck) for c in got):  # a group
            loads.append(len(got))
        return got

    monkeypatch.setattr(FleetSnapshot, "loads", staticmethod(counted))
    plain = FleetService.load(fleet, eager=False)
    at = warm._lazy_at
    assert at is not None
    for rec in warm._vms.values():
        mine = plain._vms[rec.uuid]
        assert warm._policy(rec, at) == plain._policy(mine, at)
        assert warm._vm_check(rec, at) == plain._vm_check(mine, at)
    assert not warm._lazy
    assert len(loads) == -(-len(warm._vms) // group) and sum(loads) == len(warm._vms)
