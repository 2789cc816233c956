"""The host guard refuses rolled-back policies and owner swaps, with escort's own check.

The console remembers per VM the owner and highest policy ``seq`` it has seen
(adapters/state.py); `escort hosts guard install` pushes that memory (``seen`` in
guard.json), and the guard remembers what it admitted itself on the host. Either
memory feeds the same ``PolicyBook.continuity`` the console runs, so the codes are
the same: ``policy.rollback``, ``policy.owner_changed``, ``policy.handover_invalid``.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from console.core import envelope as env
from console.core import policy as pol
from console.core.errors import InputError
from console.core.guard import (
    GuardConfig,
    guard_decide,
    material_digest,
    memory_bytes,
    merge_seen,
    parse_memory,
    seen_digest,
)
from console.services.fleet import FleetService
from console.services.guard import payload, plan_for, policies_seen
from tests.unit.test_guard import SYSTEM_PYTHON, _plan, _unpack, domain_xml
from tests.unit.trustkit import T0, WEB_UUID, FleetFiles, Owner, build_fleet, fp

HOST = "hv-fr-1"


@pytest.fixture()
def fleet(tmp_path: Path) -> FleetFiles:
    return build_fleet(tmp_path)


def web_policy(fleet: FleetFiles, owner: Owner, seq: int, handover: str = "") -> str:
    """web-1's policy (the same shape as the fleet's) with a chosen seq and signer."""
    payload = pol.build_policy_payload(
        owner=owner.email, vm_uuid=WEB_UUID, vm_name="web-1",
        trusted_cas=[("Region EU", fp(fleet.kit.eu.cert))],
        require={"country": ["DE", "FR"], "policies": ["assurance:high"]},
        not_before=T0 - dt.timedelta(days=1), not_after=T0 + dt.timedelta(days=90),
        labels=["web"], seq=seq, handover=handover)
    return pol.sign_policy(payload, owner.key, owner.chain)


def alice_to_bob(fleet: FleetFiles) -> str:
    kit = fleet.kit
    payload = pol.build_handover_payload(
        owner=kit.alice.email, vm_uuid=WEB_UUID, to=kit.bob.email, to_ca=env.spki_sha256(kit.owners_ca.cert),
        not_before=T0 - dt.timedelta(hours=1), not_after=T0 + dt.timedelta(hours=24))
    return pol.sign_handover(payload, kit.alice.key, kit.alice.chain)


def _setup(fleet: FleetFiles, *, keep_seen: bool = False) -> tuple[GuardConfig, object, bytes]:
    """hv-fr-1's guard plan; without escort's memory unless ``keep_seen`` (the fleet's own
    web-1 policy has seq = its not-before in seconds, far above the small seqs used here)."""
    s = FleetService.load(fleet.fleet, at=T0)
    config, material = _plan(s, HOST)
    if not keep_seen:
        config = replace(config, seen={})
    return config, material, (fleet.root / "certs" / f"{HOST}.pem").read_bytes()


def _decide(fleet: FleetFiles, config: GuardConfig, material: object, cert: bytes, token: str,
            remembered: dict[str, pol.SeenPolicy] | None = None) -> tuple[bool, tuple[str, ...]]:
    v = guard_decide(domain_xml("web-1", WEB_UUID, token), cert, material, config, T0,  # type: ignore[arg-type]
                     remembered)
    return v.allowed, (() if v.allowed else v.codes)


def _seen_of(fleet: FleetFiles, config: GuardConfig, material: object, cert: bytes,
             token: str) -> pol.SeenPolicy:
    v = guard_decide(domain_xml("web-1", WEB_UUID, token), cert, material, config, T0)  # type: ignore[arg-type]
    assert v.allowed and v.seen is not None, v
    return v.seen


def test_rollback_is_refused_against_the_pushed_memory(fleet: FleetFiles) -> None:
    config, material, cert = _setup(fleet)
    old, new = web_policy(fleet, fleet.kit.alice, 5), web_policy(fleet, fleet.kit.alice, 7)
    # nothing remembered: both are fine (this is the gap the memory closes)
    assert _decide(fleet, config, material, cert, old) == (True, ())
    seen7 = _seen_of(fleet, config, material, cert, new)
    assert seen7.seq == 7 and seen7.owner
    pushed = replace(config, seen={WEB_UUID: seen7})
    allowed, codes = _decide(fleet, pushed, material, cert, old)
    assert not allowed and codes == ("policy.rollback",)
    v = guard_decide(domain_xml("web-1", WEB_UUID, old), cert, material, pushed, T0)  # type: ignore[arg-type]
    assert v.line().startswith("escort-guard refused web-1: policy.rollback: ")
    assert "sequence 7" in v.line()
    assert _decide(fleet, pushed, material, cert, new) == (True, ())
    assert _decide(fleet, pushed, material, cert, web_policy(fleet, fleet.kit.alice, 7)) == (True, ())
    assert _decide(fleet, pushed, material, cert, web_policy(fleet, fleet.kit.alice, 8)) == (True, ())


def test_owner_change_needs_the_previous_owners_handover(fleet: FleetFiles) -> None:
    config, material, cert = _setup(fleet)
    kit = fleet.kit
    pushed = replace(config, seen={WEB_UUID: _seen_of(fleet, config, material, cert,
                                                       web_policy(fleet, kit.alice, 5))})
    # Bob is certified by the same owners' CA; without Alice's hand-over he may not take web-1
    assert _decide(fleet, pushed, material, cert, web_policy(fleet, kit.bob, 9)) == (
        False, ("policy.owner_changed",))
    h = alice_to_bob(fleet)
    assert _decide(fleet, pushed, material, cert, web_policy(fleet, kit.bob, 9, handover=h)) == (True, ())
    assert _decide(fleet, pushed, material, cert, web_policy(fleet, kit.bob, 5, handover=h)) == (
        False, ("policy.rollback",))
    # a "hand-over" Bob signed himself does not count
    fake = pol.sign_handover(pol.build_handover_payload(
        owner=kit.bob.email, vm_uuid=WEB_UUID, to=kit.bob.email, to_ca=env.spki_sha256(kit.owners_ca.cert),
        not_before=T0 - dt.timedelta(hours=1), not_after=T0 + dt.timedelta(hours=1)),
        kit.bob.key, kit.bob.chain)
    assert _decide(fleet, pushed, material, cert, web_policy(fleet, kit.bob, 9, handover=fake)) == (
        False, ("policy.handover_invalid",))


def test_the_guards_own_memory_counts_too(fleet: FleetFiles) -> None:
    """What the guard admitted on this host (``remembered``) raises the bar like escort's memory."""
    config, material, cert = _setup(fleet)
    kit = fleet.kit
    seen9 = _seen_of(fleet, config, material, cert, web_policy(fleet, kit.alice, 9))
    assert _decide(fleet, config, material, cert, web_policy(fleet, kit.alice, 4), {WEB_UUID: seen9}) == (
        False, ("policy.rollback",))
    assert _decide(fleet, config, material, cert, web_policy(fleet, kit.bob, 20), {WEB_UUID: seen9}) == (
        False, ("policy.owner_changed",))
    # two memories: the higher seq wins whichever holds it
    seen3 = replace(seen9, seq=3, digest="x")
    assert merge_seen({WEB_UUID: seen3}, {WEB_UUID: seen9})[WEB_UUID] == seen9
    assert merge_seen({WEB_UUID: seen9}, {WEB_UUID: seen3})[WEB_UUID] == seen9
    pushed = replace(config, seen={WEB_UUID: seen3})
    assert _decide(fleet, pushed, material, cert, web_policy(fleet, kit.alice, 5), {WEB_UUID: seen9}) == (
        False, ("policy.rollback",))
    assert _decide(fleet, pushed, material, cert, web_policy(fleet, kit.alice, 5)) == (True, ())


def test_guard_and_escort_give_the_same_verdict_after_a_rollback(fleet: FleetFiles) -> None:
    """The memory escort pushes comes from what it has seen: escort and the guard agree."""
    policy_file = fleet.root / "policies" / "web-1.jws"
    old = web_policy(fleet, fleet.kit.alice, 5)
    policy_file.write_text(web_policy(fleet, fleet.kit.alice, 7))
    first = FleetService.load(fleet.fleet, at=T0)
    assert first.explain(WEB_UUID, HOST).allowed  # seen (and remembered) by the console
    policy_file.write_text(old)  # someone puts the older policy back
    second = FleetService.load(fleet.fleet, at=T0)
    d = second.explain(WEB_UUID, HOST)
    escort_codes = [r.code for r in d.reasons if r.severity == "error" and r.code != "host.current"]
    assert escort_codes == ["policy.rollback"]
    seen = policies_seen(second)
    assert seen[WEB_UUID].seq == 7  # the rolled-back policy did not lower what is pushed
    config, material = _plan(second, HOST)
    assert config.seen[WEB_UUID].seq == 7
    cert = (fleet.root / "certs" / f"{HOST}.pem").read_bytes()
    v = guard_decide(domain_xml("web-1", WEB_UUID, old), cert, material, config, T0)
    assert not v.allowed and list(v.codes) == escort_codes
    assert v.message == next(r.message for r in d.reasons if r.code == "policy.rollback")


def test_seen_travels_in_guard_json_and_has_its_own_digest(fleet: FleetFiles) -> None:
    config, material, _cert = _setup(fleet, keep_seen=True)
    assert WEB_UUID in config.seen  # the fleet's current policies are pushed
    parsed, _ = GuardConfig.parse(json.dumps(config.as_json("d")).encode())
    assert parsed.seen == config.seen
    # the trust digest stays what it was; `status` compares the memory on its own
    bumped = replace(config, seen={**config.seen, WEB_UUID: replace(config.seen[WEB_UUID], seq=99)})
    assert material_digest(material, bumped) == material_digest(material, config)  # type: ignore[arg-type]
    assert seen_digest(bumped.seen) != seen_digest(config.seen)
    # without anything remembered guard.json has no "seen" key at all
    assert "seen" not in replace(config, seen={}).as_json()
    for bad in ({"x": 1}, {WEB_UUID: {"owner": "o", "owner_label": "l", "seq": -1, "digest": "d"}},
                {WEB_UUID: {"owner": "o", "owner_label": "l", "seq": True, "digest": "d"}},
                {WEB_UUID: {"owner": "o", "owner_label": "l", "seq": 1}}, [1]):
        raw = dict(config.as_json("d"), seen=bad)
        with pytest.raises(InputError):
            GuardConfig.parse(json.dumps(raw).encode())
    assert parse_memory(memory_bytes(config.seen), "m") == config.seen
    for data in (b"", b"{", b'{"version": 2, "vms": {}}', b'{"version": 1, "vms": {}, "vms": {}}'):
        with pytest.raises(InputError):
            parse_memory(data, "m")


@pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="needs Debian's /usr/bin/python3")
def test_hook_remembers_what_it_admitted(fleet: FleetFiles, tmp_path: Path) -> None:
    """The pushed bundle on the system python: an admitted seq is written to the guard's
    memory file (atomically), and an older policy is refused afterwards although escort
    never saw the newer one; a damaged memory refuses (fail closed)."""
    s = FleetService.load(fleet.fleet, at=T0)
    assert s.spec is not None
    spec = next(h for h in s.spec.hosts if h.name == HOST)
    spec = type(spec)(**{**spec.__dict__, "remote_cert": str(fleet.root / "certs" / f"{HOST}.pem")})
    plan = plan_for(s, spec, seen={})  # escort pushes no memory: only the guard's own counts
    root = tmp_path / "host"
    _unpack(payload(plan, with_code=True), root)
    memory = root / "state" / "seen.json"
    env = {"ESCORT_GUARD_CONF": str(root / "conf"), "ESCORT_GUARD_LOG": str(root / "guard.log"),
           "ESCORT_GUARD_SEEN": str(memory), "ESCORT_GUARD_AT": T0.isoformat(), "PATH": "/usr/bin:/bin"}
    runner = (f"import sys; sys.path.insert(0, {str(root / 'lib')!r}); "
              "from console.guard.hook import main; sys.exit(main(sys.argv))")

    def hook(token: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SYSTEM_PYTHON, "-I", "-S", "-c", runner, "web-1", "migrate", "begin", "-"],
                              input=domain_xml("web-1", WEB_UUID, token), env=env, capture_output=True,
                              text=True, timeout=120, check=False)

    old, new = web_policy(fleet, fleet.kit.alice, 5), web_policy(fleet, fleet.kit.alice, 7)
    assert hook(old).returncode == 0
    assert parse_memory(memory.read_bytes(), "m")[WEB_UUID].seq == 5
    assert hook(new).returncode == 0
    assert parse_memory(memory.read_bytes(), "m")[WEB_UUID].seq == 7
    assert oct(memory.stat().st_mode & 0o777) == "0o600"
    back = hook(old)
    assert back.returncode == 1
    assert back.stderr.strip().startswith("escort-guard refused web-1: policy.rollback: "), back.stderr
    swap = hook(web_policy(fleet, fleet.kit.bob, 30))
    assert swap.returncode == 1 and "policy.owner_changed" in swap.stderr
    assert parse_memory(memory.read_bytes(), "m")[WEB_UUID].seq == 7  # refusals change nothing
    assert not list(memory.parent.glob(".*.tmp"))
    memory.write_text("{ damaged")
    broken = hook(new)
    assert broken.returncode == 1 and "guard.memory_unusable" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1
    entries = [json.loads(x) for x in (root / "guard.log").read_text().splitlines()]
    assert [e["reason"] for e in entries] == ["guard.admitted", "guard.admitted", "policy.rollback",
                                              "policy.owner_changed", "guard.memory_unusable"]
    assert entries[1]["remembered_seq"] == 7
