"""The whole-fleet snapshot (adapters/cache.py ``FleetSnapshot``): a start-up check is reused
only for byte-for-byte the same inputs and only until the next instant that matters;
any change means everything is checked anew, and the verdicts are always those of a
check made without any cache."""

from __future__ import annotations

import datetime as dt
import os
import pickle
from pathlib import Path

import pytest

from console.adapters.cache import FleetSnapshot
from console.core.timekey import next_boundary
from console.demo_scale import generate_scale
from console.services.fleet import FleetService
from tests.unit.scalekit import helper_messages, private_fleet

Verdicts = dict[str, object]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scale(tmp_path_factory.mktemp("f") / "f", vms=40, hosts=12, owners=3, rules=6)


@pytest.fixture
def fleet(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the fleet (tests change its files), a private cache and memory."""
    return private_fleet(source, tmp_path, monkeypatch)


def check(fleet: Path, at: dt.datetime | None = None, *, cache: bool = True) -> tuple[Verdicts, FleetService]:
    service = FleetService.load(fleet, eager=False, at=at)
    service.use_cache = cache
    views = [v for step in service.check_in_steps() for v in step]
    return {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
            for v in views}, service


def uncached(fleet: Path, at: dt.datetime | None = None) -> Verdicts:
    return check(fleet, at, cache=False)[0]


def explained(service: FleetService) -> list[tuple[str, str, bool, list[str]]]:
    vm = next(iter(service._vms.values())).name
    return [(d.vm, d.host, d.allowed, [r.code for r in d.reasons]) for d in service.targets(vm)]


def snapshot_file(fleet: Path) -> Path:
    return FleetSnapshot(fleet).path


def test_second_check_reuses_the_snapshot_and_decides_the_same(fleet: Path) -> None:
    cold, s1 = check(fleet)
    assert s1.check_source == "computed"
    path = snapshot_file(fleet)
    assert path.is_file() and oct(path.stat().st_mode & 0o777) == "0o600"
    warm, s2 = check(fleet)
    assert s2.check_source == "snapshot"
    assert warm == cold == uncached(fleet)
    # the full decisions (every host's reasons) and the host chains agree too
    assert explained(s2) == explained(s1)
    assert [(h.spec.name, h.chain.valid if h.chain else None) for h in s2.hosts()] == \
           [(h.spec.name, h.chain.valid if h.chain else None) for h in s1.hosts()]
    assert s2.matrix().targets == s1.matrix().targets


def _resign_other_policy(fleet: Path) -> None:
    """Give the first VM the second VM's (validly signed) policy: a changed token."""
    files = sorted((fleet.parent / "policies").iterdir())
    files[0].write_bytes(files[1].read_bytes())


def _swap_host_cert(fleet: Path) -> None:
    certs = sorted((fleet.parent / "hosts").iterdir())
    certs[0].write_bytes(certs[1].read_bytes())


def _change_crl(fleet: Path) -> None:
    crl = sorted((fleet.parent / "trust").glob("*.crl.pem"))[0]
    crl.write_bytes(crl.read_bytes() + b"\n")  # same CRL, other bytes: still a different input


def _remove_crl(fleet: Path) -> None:
    sorted((fleet.parent / "trust").glob("*.crl.pem"))[0].unlink()


def _owner_ca(fleet: Path) -> None:
    (fleet.parent / "owners-trust" / "owners-ca.crl.pem").unlink()


def _fleet_entry(fleet: Path) -> None:
    fleet.write_text(fleet.read_text().replace('name = "vm-0000"', 'name = "vm-renamed"', 1))


def _memory(fleet: Path) -> None:
    from console.adapters.state import state_dir

    for f in state_dir().glob("*.json"):  # another console saw a newer policy of the first VM
        text = f.read_text().replace('"digest": "', '"digest": "0', 1)
        f.write_text(text.replace('"seq": ', '"seq": 9', 1))


@pytest.mark.parametrize("change", [_resign_other_policy, _swap_host_cert, _change_crl,
                                    _remove_crl, _owner_ca, _fleet_entry, _memory])
def test_any_changed_input_means_a_new_check(fleet: Path, change: object) -> None:
    check(fleet)
    assert check(fleet)[1].check_source == "snapshot"
    change(fleet)  # type: ignore[operator]
    after, service = check(fleet)
    assert service.check_source == "computed"
    assert after == uncached(fleet)
    assert check(fleet)[1].check_source == "snapshot"  # rewritten for the new inputs


def test_the_memory_change_is_a_rollback_refusal_not_a_stale_verdict(fleet: Path) -> None:
    cold, _ = check(fleet)
    _memory(fleet)
    after, _ = check(fleet)
    assert after != cold
    assert sum("policy.rollback" in codes for _, _, _, codes in after.values()) == 1  # type: ignore[misc,operator]


def test_time_passing_an_instant_that_matters_means_a_new_check(fleet: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    cold, s1 = check(fleet, now)
    instants = sorted(s1._instant_set)
    nxt = next_boundary(instants, now)
    assert nxt is not None
    within = now + (nxt - now) / 2
    same, s2 = check(fleet, within)
    assert s2.check_source == "snapshot" and same == cold
    past = nxt + dt.timedelta(seconds=1)
    later, s3 = check(fleet, past)
    assert s3.check_source == "computed" and later == uncached(fleet, past)


def test_after_every_policy_expired_the_verdicts_say_so(fleet: Path) -> None:
    check(fleet)
    assert check(fleet)[1].check_source == "snapshot"
    much_later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3 * 365)
    later, service = check(fleet, much_later)
    assert service.check_source == "computed"
    assert all(not targets for _, targets, _, _ in later.values())  # type: ignore[misc]
    assert later == uncached(fleet, much_later)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00 not a snapshot")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flipped(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF
    path.write_bytes(bytes(data))


def _group_writable(path: Path) -> None:
    os.chmod(path, 0o664)


def _foreign_code(path: Path) -> None:
    """A well-formed file (right header, matching digest) whose body would run code."""
    head = path.read_bytes().partition(b"\n")[0].split(b" ")
    body = pickle.dumps(Boom())
    import hashlib

    head[3] = hashlib.sha256(body).hexdigest().encode()
    path.write_bytes(b" ".join(head) + b"\n" + body)


class Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/escort-snapshot-ran-code",))


@pytest.mark.parametrize("damage", [_garbage, _truncated, _flipped, _group_writable, _foreign_code])
def test_a_corrupt_or_foreign_snapshot_is_ignored_and_rebuilt(fleet: Path, damage: object) -> None:
    cold, _ = check(fleet)
    damage(snapshot_file(fleet))  # type: ignore[operator]
    again, service = check(fleet)
    assert service.check_source == "computed" and again == cold
    assert not Path("/tmp/escort-snapshot-ran-code").exists()
    rebuilt, s3 = check(fleet)
    assert s3.check_source == "snapshot" and rebuilt == cold


def test_an_unwritable_cache_dir_means_no_cache_and_one_notice(fleet: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(blocker / "c"))
    result, service = check(fleet)
    assert service.cache_notice.startswith("no cache of verified results:")
    assert "\n" not in service.cache_notice
    assert result == uncached(fleet)
    assert check(fleet)[1].check_source == "computed"


def test_no_cache_env_turns_the_snapshot_off(fleet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check(fleet)
    monkeypatch.setenv("ESCORT_NO_CACHE", "1")
    assert check(fleet)[1].check_source == "computed"


def test_a_refresh_is_never_answered_from_the_snapshot(fleet: Path) -> None:
    check(fleet)
    service = FleetService.load(fleet, eager=False)
    service.use_cache = True
    host = next(iter(service._hosts))
    service.apply_facts(host, None, None)  # the host did not answer
    list(service.check_in_steps())
    assert service.check_source == "computed"


@pytest.mark.parametrize("warm", [False, True])
def test_the_helper_process_changes_no_verdict(fleet: Path, warm: bool) -> None:
    """``start_prefetch`` (the console's second core): same verdicts, cold and warm."""
    if warm:
        check(fleet)
    service = FleetService.load(fleet, eager=False)
    service.use_cache = True
    started = service.start_prefetch()
    views = {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
             for step in service.check_in_steps() for v in step}
    if (os.cpu_count() or 1) > 1:
        assert started
    assert service.check_source == ("snapshot" if warm else "computed")
    assert views == uncached(fleet)
    assert explained(service) == explained(check(fleet, cache=False)[1])


def from_both_ends(order: list[str], listed: list[str]) -> tuple[int, int]:
    """(VMs decided from the front, from the back) when ``order`` decides every VM of
    ``listed`` once, each either the first or the last of those not decided yet (the last
    one of all counts as the front's); else fails."""
    assert sorted(order) == sorted(listed) and len(set(order)) == len(order)
    lo, hi = 0, len(listed) - 1
    for uuid in order:
        if uuid == listed[lo]:
            lo += 1
        else:
            assert uuid == listed[hi], "decided neither from the front nor from the back"
            hi -= 1
    return lo, len(listed) - lo


def test_with_the_helper_verdicts_arrive_from_both_ends_each_once(fleet: Path) -> None:
    """Cold, with the helper: the console decides the VMs it lists in its order (the rows on
    screen first) as the helper's tokens come in, and while the next one is not open yet it
    decides from the last VM back (opening those tokens itself) until both ends meet: every
    VM once, the same verdicts as without the helper."""
    service = FleetService.load(fleet, eager=False)
    service.use_cache = True
    service.start_prefetch()
    views = [v for step in service.check_in_steps() for v in step]
    assert service.check_source == "computed"
    from_both_ends([v.uuid for v in views], [v.uuid for v in service.vm_stubs()])
    assert {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
            for v in views} == uncached(fleet)


def test_while_the_helper_is_behind_the_console_decides_from_the_last_vm_back(
        fleet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper (played over a real pipe with what ``_prefetch_main`` sends) has opened only
    the first 10 of 40 VMs' tokens and sends nothing more: the console decides the other 30
    from the last one back, opening their tokens itself, and never waits for the helper (whose
    pipe stays open until the check is over). Same verdicts as without the helper. (No first
    rows opened by the console while it waits for the host checks: tested below.)"""
    import multiprocessing
    import threading

    from console.core.envelope import TYP_POLICY, pack_opened
    from console.core.policy import POLICY_FIELDS
    from console.services import fleet as svc

    monkeypatch.setattr(svc, "FIRST_ROWS", 0)

    messages = helper_messages(fleet)
    assert [m[0] for m in messages][:3] == ["tokens", "hosts", "opened"] and messages[-1] == ("done",)
    tokens = messages[0][3]
    assert len(tokens) == 40 and len(set(tokens)) == 40
    first, _ = pack_opened(tokens[:10], TYP_POLICY, POLICY_FIELDS)
    played = [*messages[:3], ("packed", first)]

    console = FleetService.load(fleet, eager=False)
    receive, send = multiprocessing.Pipe(duplex=False)
    console._prefetch = (None, receive)  # type: ignore[assignment]
    over = threading.Event()

    def play() -> None:
        for m in played:
            send.send(m)
        over.wait(120)  # (a guard against hanging the suite, not a timing)
        send.close()

    sender = threading.Thread(target=play)
    sender.start()
    try:
        views = [v for step in console.check_in_steps() for v in step]
    finally:
        over.set()
        sender.join()
    assert console.check_source == "computed"
    front, back = from_both_ends([v.uuid for v in views], [v.uuid for v in console.vm_stubs()])
    assert front <= 11 and front + back == 40  # (the 10 the helper opened, the last one either way)
    assert {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
            for v in views} == uncached(fleet)


def test_while_the_helper_checks_the_hosts_the_console_opens_the_first_rows_tokens_first(
        fleet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting for the helper's host checks, the console opens the first rows' tokens first
    (the rows on screen get their verdicts as soon as the hosts are in), then from the last
    one back. The helper is played over a real pipe: its tokens only, until the console has
    opened 16 of them; then its host checks, then it ends. Same verdicts as without it."""
    import multiprocessing
    import threading

    from console.core.envelope import TYP_POLICY
    from console.services import fleet as svc

    monkeypatch.setattr(svc, "FIRST_ROWS", 24)
    messages = helper_messages(fleet)
    assert [m[0] for m in messages][:2] == ["tokens", "hosts"]
    tokens = messages[0][3]

    console = FleetService.load(fleet, eager=False)
    receive, send = multiprocessing.Pipe(duplex=False)
    console._prefetch = (None, receive)  # type: ignore[assignment]
    hosts_now = threading.Event()

    def play() -> None:  # (a thread: a message may be more than a pipe holds)
        send.send(messages[0])
        hosts_now.wait(120)  # (a guard against hanging the suite, not a timing)
        send.send(messages[1])
        send.close()

    sender = threading.Thread(target=play)
    sender.start()
    steps = console.check_in_steps(budget_s=0.0)  # a step per 8 tokens opened while waiting
    envelopes = console._policies.envelopes
    views = []
    try:
        for _ in range(10_000):  # (bounded; the assertions below decide)
            views.extend(next(steps))
            opened = [envelopes.is_open(t, TYP_POLICY) for t in tokens]
            if sum(opened) >= 16:
                break
        assert views == [] and sum(opened) == 16
        assert opened[:16] == [True] * 16  # the first rows' tokens, none from the back yet
        for _ in range(2):  # 8 more: the first 24; 8 more: from the last one back
            views.extend(next(steps))
        opened = [envelopes.is_open(t, TYP_POLICY) for t in tokens]
        assert opened == [True] * 24 + [False] * 8 + [True] * 8
        hosts_now.set()
        views.extend(v for step in steps for v in step)
    finally:
        hosts_now.set()
        sender.join()
        steps.close()
    assert console.check_source == "computed"
    assert {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
            for v in views} == uncached(fleet)


def test_the_helper_ends_when_the_console_stops_listening(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper's sends fail (and it ends) once the console has closed its end of the pipe,
    instead of blocking on a full pipe forever: the fork's copy of the console's end is closed."""
    fleet = generate_scale(tmp_path / "big", vms=200, hosts=4, owners=2, rules=2)  # > one pipe buffer
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    service = FleetService.load(fleet, eager=False)
    service.use_cache = True
    if not service.start_prefetch():
        _no_helper()
    assert service._prefetch is not None
    proc, conn = service._prefetch
    conn.close()  # the console stopped listening before the helper's first message
    proc.join(120)  # a guard against hanging the suite, not a timing
    assert proc.exitcode == 0


def _no_helper() -> None:
    """``start_prefetch`` declined. Skipped only where it must decline (one core, no fork); on
    this project's machines it is a failure naming why: a thread another test left running
    (the console forks its helper only while no other thread runs)."""
    import multiprocessing
    import os
    import threading

    if (os.cpu_count() or 1) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("the helper needs fork and two cores")
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    pytest.fail(f"no helper process on a machine that can run one; threads alive: {others}")


def hosts_seen(service: FleetService) -> list[tuple[object, ...]]:
    return [(h.spec.name, h.chain is not None and h.chain.valid,
             [r.code for r in h.chain.reasons] if h.chain else None, h.attributes,
             h.cert_problem.code if h.cert_problem else None) for h in service.hosts()]


def test_the_helpers_host_checks_are_the_consoles(fleet: Path) -> None:
    """Cold, the helper checks the host chains while the UI starts and the console adopts
    them (it reads no host certificate itself): hosts and VMs as without the helper."""
    service = FleetService.load(fleet, eager=False)
    service.use_cache = True
    if not service.start_prefetch():
        _no_helper()
    views = {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
             for step in service.check_in_steps() for v in step}
    assert service.check_source == "computed"
    assert service._cert_pending == set(service._hosts)  # adopted: not one certificate read here
    plain = check(fleet, cache=False)[1]
    assert views == uncached(fleet)
    assert hosts_seen(service) == hosts_seen(plain)
    assert explained(service) == explained(plain)


def test_host_checks_from_the_helper_are_adopted_only_while_fresh(fleet: Path) -> None:
    """``_adopt_hosts``: checks made at ``when`` are adopted for ``at`` only if no instant
    of a certificate or CRL lies between (else every host is checked anew here)."""
    from console.adapters.cache import FleetSnapshot

    helper = FleetService.load(fleet, eager=False)
    instant = sorted(t for t in helper._instant_set if t > dt.datetime.now(dt.UTC))[0]
    when = instant - dt.timedelta(seconds=1)
    hosts = {n: (helper._host_check(n, when), v.attributes, v.cert_problem) for n, v in helper._hosts.items()}
    blob = FleetSnapshot.dumps(hosts)
    extra = FleetSnapshot.dumps((tuple(sorted(helper._instant_set)), [], []))
    soon, past = when + dt.timedelta(microseconds=1), instant + dt.timedelta(seconds=1)
    for at, adopted in ((soon, True), (past, False)):
        service = FleetService.load(fleet, eager=False)
        service._adopt_hosts(when, blob, extra, at)
        assert bool(service._checks) is adopted, at
        assert all(when_at == at for when_at, _ in service._checks.values())
    service = FleetService.load(fleet, eager=False)
    service._adopt_hosts(when, b"not a pickle", extra, when)
    assert not service._checks


def test_host_checks_arriving_after_a_refresh_are_not_adopted(fleet: Path) -> None:
    """A refresh while the console waits for the helper's host checks: they were made from
    the files before it, so they are not adopted, and the next check decides as without
    the helper. The helper is played by this test (one end of a real pipe)."""
    import multiprocessing

    from console.adapters.cache import FleetSnapshot

    service = FleetService.load(fleet, eager=False)
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    service._prefetch = (None, receive)  # type: ignore[assignment]
    helper = FleetService.load(fleet, eager=False)
    tokens = []
    for rec in helper._vms.values():
        helper._read_token(rec)
        tokens.append(rec.token if rec.token_problem is None else rec.token_problem)
    import threading

    sender = threading.Thread(target=send.send, args=(("tokens", "", False, tokens),))
    sender.start()  # (more than a pipe buffer: sent while the console reads it)
    steps = service.check_in_steps(budget_s=0.0)
    while service.check_source != "computed":
        assert next(steps) == []
    assert next(steps) == []  # waiting for the host checks
    host = next(iter(service._hosts))
    service.apply_facts(host, None, None)  # a refresh: the host did not answer
    at = helper.at
    hosts = {n: (helper._host_check(n, at), v.attributes, v.cert_problem) for n, v in helper._hosts.items()}
    send.send(("hosts", at, FleetSnapshot.dumps(hosts),
               FleetSnapshot.dumps((tuple(sorted(helper._instant_set)), [], []))))
    list(steps)
    sender.join()
    assert (host,) not in service._checks or service._checks[(host,)][1].chain is None \
        or service._checks[(host,)][1] != hosts[host][0]
    after = {v.uuid: (v.allowed_targets, [r.code for r in v.policy_problems])
             for step in service.check_in_steps() for v in step}
    plain = FleetService.load(fleet, eager=False)
    plain.apply_facts(host, None, None)
    assert after == {v.uuid: (v.allowed_targets, [r.code for r in v.policy_problems])
                     for step in plain.check_in_steps() for v in step}


def test_with_the_helper_an_unreadable_host_certificate_is_reported_once(fleet: Path) -> None:
    first = sorted((fleet.parent / "hosts").iterdir())[0]
    first.write_bytes(b"not a certificate")

    def seen(helper: bool) -> tuple[list[str], list[tuple[object, ...]]]:
        service = FleetService.load(fleet, eager=False)
        service.use_cache = helper
        if helper:
            service.start_prefetch()
        list(service.check_in_steps())
        service.hosts()
        service.explain(next(iter(service._vms.values())).name, next(iter(service._hosts)))
        shown = hosts_seen(service)
        later = sorted(t for t in service._instant_set if t > dt.datetime.now(dt.UTC))[0]
        for name in service._hosts:  # checked anew past an instant: read again only if never read
            service._host_check(name, later + dt.timedelta(seconds=1))
        return [p.reason.code for p in service.problems], shown

    with_helper, without = seen(True), seen(False)
    assert with_helper == without
    assert with_helper[0].count("cert.unreadable") == 1


def test_the_helper_reading_an_unreadable_policy_still_reports_it(fleet: Path) -> None:
    first = sorted((fleet.parent / "policies").iterdir())[0]
    first.write_bytes(b"\xff\xfe not a token")
    service = FleetService.load(fleet, eager=False)
    service.use_cache = True
    service.start_prefetch()
    views = {v.uuid: [r.code for r in v.policy_problems] for step in service.check_in_steps() for v in step}
    assert sum(codes == ["policy.unreadable"] for codes in views.values()) == 1
    assert any(p.reason.code == "policy.unreadable" for p in service.problems)


def test_a_refresh_before_the_helper_answers_keeps_the_verdicts_right(fleet: Path) -> None:
    def refreshed(prefetch: bool) -> Verdicts:
        service = FleetService.load(fleet, eager=False)
        service.use_cache = prefetch
        if prefetch:
            service.start_prefetch()
        service.apply_facts(next(iter(service._hosts)), None, None)  # a host did not answer
        return {v.uuid: (v.allowed_targets, [r.code for r in v.policy_problems])
                for step in service.check_in_steps() for v in step}

    assert refreshed(True) == refreshed(False)


def _warm_helper(fleet: Path) -> FleetService:
    """A warm launch's service whose helper has already answered (its process has exited)."""
    service = FleetService.load(fleet, eager=False)
    service.use_cache = True
    if not service.start_prefetch():
        _no_helper()
    assert service._prefetch is not None
    service._prefetch[0].join(60)
    return service


def test_the_helper_answers_a_hit_with_the_key_alone(fleet: Path) -> None:
    """On a hit the snapshot's own tokens are used: the helper sends no 15 MB of tokens."""
    import multiprocessing

    check(fleet)
    service = FleetService.load(fleet, eager=False)
    service.use_cache = True
    receive, send = multiprocessing.Pipe(duplex=False)
    from console.services.fleet import _prefetch_main

    _prefetch_main(service, send)
    kind, key, hit, tokens = receive.recv()
    assert (kind, hit, tokens) == ("tokens", True, None) and len(key) == 64


def test_tokens_from_the_snapshot_are_the_files_tokens(fleet: Path) -> None:
    cold, s1 = check(fleet)
    service = _warm_helper(fleet)
    views = {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
             for step in service.check_in_steps() for v in step}
    assert service.check_source == "snapshot" and views == cold
    for spec in service.spec.vms if service.spec else ():
        assert service.policy_token(spec.uuid) == Path(spec.policy_file).read_text().strip()
    assert explained(service) == explained(s1)


def test_a_policy_changed_after_the_helper_read_it_changes_nothing_it_decided(fleet: Path) -> None:
    """The key the helper made covers the files as it read them; the console then holds exactly
    those tokens (the snapshot's), never a mix with what a file says a moment later."""
    cold, _ = check(fleet)
    service = _warm_helper(fleet)
    first = sorted((fleet.parent / "policies").iterdir())[0]
    before = first.read_text().strip()
    _resign_other_policy(fleet)  # after the helper's read, before the console's restore
    views = {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
             for step in service.check_in_steps() for v in step}
    assert service.check_source == "snapshot" and views == cold
    vm = next(v for v in service.spec.vms if Path(v.policy_file) == first) if service.spec else None
    assert vm is not None and service.policy_token(vm.uuid) == before
    # the next launch sees the change: a new check, verdicts as without any cache
    after, s3 = check(fleet)
    assert s3.check_source == "computed" and after == uncached(fleet)
    assert s3.policy_token(vm.uuid) == first.read_text().strip() != before


def _flip_first(path: Path) -> None:
    head, _, body = path.read_bytes().partition(b"\n")
    data = bytearray(body)
    data[len(data) // 1000] ^= 0xFF  # in the first part; the header (the key) is untouched
    path.write_bytes(head + b"\n" + bytes(data))


def test_a_snapshot_that_fails_after_the_helper_found_it_means_a_full_check(fleet: Path) -> None:
    cold, _ = check(fleet)
    _flip_first(snapshot_file(fleet))  # the helper looks at the header only: a hit
    service = _warm_helper(fleet)
    views = {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
             for step in service.check_in_steps() for v in step}
    assert service.check_source == "computed" and views == cold == uncached(fleet)
    again, s3 = check(fleet)
    assert s3.check_source == "snapshot" and again == cold  # rewritten under the files' key


def _rewrite_rest(path: Path, change: object) -> None:
    """Change the snapshot's second part (tokens, checks, hosts) and store it with a matching
    digest: a well-formed file whose tokens are not the ones its key was made of."""
    import hashlib

    head, _, body = path.read_bytes().partition(b"\n")
    fields = head.split(b" ")
    size = int(fields[4])
    rest = FleetSnapshot.loads(body[size:])
    assert isinstance(rest, dict)
    change(rest)  # type: ignore[operator]
    two = FleetSnapshot.dumps(rest)
    fields[5] = hashlib.sha256(two).hexdigest().encode()
    path.write_bytes(b" ".join(fields) + b"\n" + body[:size] + two)


def _other_token(rest: dict[str, list[tuple[object, ...]]]) -> None:
    uuid, name, host, _token, problem = rest["inputs"][0]
    rest["inputs"][0] = (uuid, name, host, rest["inputs"][1][3], problem)


def test_a_snapshot_holding_other_tokens_than_the_files_read_is_never_adopted(fleet: Path) -> None:
    """Without the helper the console reads every file itself: a snapshot (even under the right
    key) whose tokens differ from them is not used."""
    cold, _ = check(fleet)
    _rewrite_rest(snapshot_file(fleet), _other_token)
    again, service = check(fleet)
    assert service.check_source == "computed" and again == cold
    assert service.spec is not None
    vm = service.spec.vms[0]
    assert service.policy_token(vm.uuid) == Path(vm.policy_file).read_text().strip()


def _flip_rest(path: Path) -> None:
    head, _, body = path.read_bytes().partition(b"\n")
    size = int(head.split(b" ")[4])
    data = bytearray(body)
    data[size + 100] ^= 0xFF
    path.write_bytes(head + b"\n" + bytes(data))


def test_a_damaged_second_part_found_after_the_first_rows_means_a_full_check(fleet: Path) -> None:
    """With the helper the snapshot's tokens and checks are taken after the first rows' verdicts
    are out; if they turn out damaged, everything restored is dropped and every VM is checked
    anew (the rows shown first get their checked verdicts too)."""
    cold, _ = check(fleet)
    _flip_rest(snapshot_file(fleet))
    service = _warm_helper(fleet)
    seen: dict[str, list[object]] = {}
    for step in service.check_in_steps():
        for v in step:
            seen.setdefault(v.uuid, []).append((v.owner, v.allowed_targets, v.policy_summary,
                                                [r.code for r in v.policy_problems]))
    assert service.check_source == "computed"
    assert {u: views[-1] for u, views in seen.items()} == cold == uncached(fleet)
    assert not service._restored and not service._lazy
    assert sum(p.reason.code == "policy.unreadable" for p in service.problems) == 0
    again, s3 = check(fleet)
    assert s3.check_source == "snapshot" and again == cold  # rewritten whole


def test_a_question_between_the_first_rows_and_the_rest_gets_the_snapshots_token(fleet: Path) -> None:
    """Between the first rows' verdicts and the snapshot's second part, any question about a
    policy takes that part first: the token answered is the one the key covered."""
    check(fleet)
    service = _warm_helper(fleet)
    steps = service.check_in_steps()
    first = next(step for step in steps if step)
    assert service.check_source == "snapshot" and service._rest is not None  # not taken yet
    vm = service.spec.vms[-1] if service.spec else None
    assert vm is not None
    assert service.policy_token(vm.uuid) == Path(vm.policy_file).read_text().strip()
    assert service._rest is None
    rest = [v for step in steps for v in step]
    assert service.check_source == "snapshot" and len(first) + len(rest) == len(service._vms)


def test_the_snapshot_read_while_the_console_starts_is_used_under_the_helpers_key(
        fleet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cold, _ = check(fleet)
    service = _warm_helper(fleet)
    assert service._preloaded is not None
    service._preloaded[0].join(60)
    loads: list[object] = []
    original = FleetSnapshot.load_split

    def counted(self: FleetSnapshot, key: str | None) -> object:
        loads.append(key)
        return original(self, key)

    monkeypatch.setattr(FleetSnapshot, "load_split", counted)
    views = {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
             for step in service.check_in_steps() for v in step}
    assert service.check_source == "snapshot" and views == cold and loads == []


def test_a_snapshot_read_while_the_console_starts_under_another_key_is_not_used(fleet: Path) -> None:
    """A policy changed after the snapshot was written: the snapshot read at start carries the
    old key, the helper computes the new one; the fleet is checked anew."""
    check(fleet)
    _resign_other_policy(fleet)
    service = _warm_helper(fleet)
    views = {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
             for step in service.check_in_steps() for v in step}
    assert service.check_source == "computed" and views == uncached(fleet)
    first = sorted((fleet.parent / "policies").iterdir())[0]
    vm = next(v for v in service.spec.vms if Path(v.policy_file) == first) if service.spec else None
    assert vm is not None and service.policy_token(vm.uuid) == first.read_text().strip()
