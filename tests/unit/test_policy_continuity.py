"""Policies cannot be swapped or rolled back: sequence numbers, owner hand-overs, escort's
memory of what it has seen (state adapter), and fleet-file vs <metadata> conflicts."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
from pathlib import Path

import pytest
from click.testing import CliRunner

from console.adapters import state
from console.cli import main
from console.core import envelope as env
from console.core import issuance as iss
from console.core import policy as pol
from console.core.inventory import DomainFacts, HostFacts
from console.core.pki import TrustStore
from console.services.fleet import FleetService
from tests.unit.trustkit import T0, WEB_UUID, Kit, Owner, _owner, build_fleet, fp, make_kit

VM = WEB_UUID


@pytest.fixture(scope="module")
def kit() -> Kit:
    return make_kit()


@pytest.fixture(scope="module")
def store(kit: Kit) -> TrustStore:
    """The real owners' trust store with two owners' CAs."""
    s, problems = TrustStore.build([("owners.pem", iss.cert_pem(kit.owners_ca.cert)),
                                    ("second.pem", iss.cert_pem(kit.rogue_owners_ca.cert))], [], at=T0,
                                       missing_crl="warn")
    assert problems == []
    return s


def policy(kit: Kit, owner: Owner, seq: int, *, country: str = "DE", handover: str = "",
           vm: str = VM) -> str:
    payload = pol.build_policy_payload(
        owner=owner.email, vm_uuid=vm, vm_name="web-1", trusted_cas=[("EU", fp(kit.eu.cert))],
        require={"country": [country]}, not_before=T0 - dt.timedelta(days=1),
        not_after=T0 + dt.timedelta(days=30), seq=seq, handover=handover)
    return pol.sign_policy(payload, owner.key, owner.chain)


def handover(kit: Kit, frm: Owner, to: Owner, to_ca: iss.Issuer, *, vm: str = VM,
             hours: float = 24) -> str:
    payload = pol.build_handover_payload(
        owner=frm.email, vm_uuid=vm, to=to.email, to_ca=env.spki_sha256(to_ca.cert),
        not_before=T0 - dt.timedelta(hours=1), not_after=T0 + dt.timedelta(hours=hours))
    return pol.sign_handover(payload, frm.key, frm.chain)


def remember(book: pol.PolicyBook, token: str) -> None:
    r = book.verify(token, T0, vm_uuid=VM)
    assert r.valid and r.owner is not None and r.policy is not None, r.reasons
    book.seen[VM] = pol.SeenPolicy(r.owner.key, r.owner.full_label(), r.policy.seq, r.digest)


def codes(book: pol.PolicyBook, token: str) -> list[str]:
    return [r.code for r in book.verify(token, T0, vm_uuid=VM).reasons]


# ------------------------------------------------------------------ the core rules

def test_older_policy_is_a_rollback(kit: Kit, store: TrustStore) -> None:
    book = pol.PolicyBook(store)
    old, new = policy(kit, kit.alice, 5, country="US"), policy(kit, kit.alice, 7)
    assert codes(book, old) == []  # on its own (nothing remembered) it is fine
    remember(book, new)
    assert codes(book, old) == ["policy.rollback"]
    assert "already seen sequence 7" in book.verify(old, T0, vm_uuid=VM).reasons[0].message
    assert codes(book, new) == []
    assert codes(book, policy(kit, kit.alice, 8)) == []  # newer is fine
    # the same seq signed again is accepted (ECDSA signatures differ each time)
    assert codes(book, policy(kit, kit.alice, 7)) == []


def test_another_owner_needs_a_handover(kit: Kit, store: TrustStore) -> None:
    book = pol.PolicyBook(store)
    remember(book, policy(kit, kit.alice, 5))
    # Bob is certified by the same owners' CA, and may not simply take the VM over
    assert codes(book, policy(kit, kit.bob, 9)) == ["policy.owner_changed"]
    # an impostor "alice@example.org" from the second owners' CA is another owner too
    impostor = _owner("Alice", "alice@example.org", "ec", kit.rogue_owners_ca)
    assert codes(book, policy(kit, impostor, 9)) == ["policy.owner_changed"]
    # with Alice's hand-over to Bob (at Bob's CA), Bob's newer policy counts
    h = handover(kit, kit.alice, kit.bob, kit.owners_ca)
    assert codes(book, policy(kit, kit.bob, 9, handover=h)) == []
    assert codes(book, policy(kit, kit.bob, 5, handover=h)) == ["policy.rollback"]


@pytest.mark.parametrize("case", ["signed by the new owner", "other VM", "other owner named",
                                  "other CA named", "expired", "not a JWS"])
def test_bad_handovers_do_not_count(kit: Kit, store: TrustStore, case: str) -> None:
    book = pol.PolicyBook(store)
    remember(book, policy(kit, kit.alice, 5))
    other_vm = "0b8e5b8e-2f7a-4a4b-8a56-7f1e4e1c2d33"
    h = {
        "signed by the new owner": lambda: handover(kit, kit.bob, kit.bob, kit.owners_ca),
        "other VM": lambda: handover(kit, kit.alice, kit.bob, kit.owners_ca, vm=other_vm),
        "other owner named": lambda: handover(kit, kit.alice, kit.carol, kit.owners_ca),
        "other CA named": lambda: handover(kit, kit.alice, kit.bob, kit.rogue_owners_ca),
        "expired": lambda: handover(kit, kit.alice, kit.bob, kit.owners_ca, hours=-0.5),
    }.get(case)
    token = policy(kit, kit.bob, 9, handover=h() if h is not None else "a.b.c")
    why = book.verify(token, T0, vm_uuid=VM).reasons
    assert [r.code for r in why] == ["policy.handover_invalid"], why


def test_a_grant_token_is_not_a_handover(kit: Kit, store: TrustStore) -> None:
    from console.core import grants as gr

    book = pol.PolicyBook(store)
    remember(book, policy(kit, kit.alice, 5))
    payload = gr.build_grant_payload(owner=kit.alice.email, admin=gr.AdminRef("anne", "SHA256:" + "A" * 43),
                                     vms=[VM], not_before=T0 - dt.timedelta(hours=1),
                                     not_after=T0 + dt.timedelta(hours=8))
    g = gr.sign_grant(payload, kit.alice.key, kit.alice.chain)
    assert codes(book, policy(kit, kit.bob, 9, handover=g)) == ["policy.handover_invalid"]


def test_seq_is_part_of_the_signed_language(kit: Kit) -> None:
    with pytest.raises(Exception, match="seq"):
        pol.build_policy_payload(owner="a", vm_uuid=VM, vm_name="", trusted_cas=[("EU", "a" * 64)],
                                 require={}, not_before=T0, not_after=T0 + dt.timedelta(days=1), seq=-1)
    token = env.sign_raw({**json.loads(json.dumps(pol.build_policy_payload(
        owner=kit.alice.email, vm_uuid=VM, vm_name="", trusted_cas=[("EU", fp(kit.eu.cert))], require={},
        not_before=T0 - dt.timedelta(days=1), not_after=T0 + dt.timedelta(days=1)))), "seq": True},
        env.TYP_POLICY, kit.alice.key, kit.alice.chain)
    assert codes(pol.PolicyBook(kit.owners), token) == ["policy.malformed"]


# ------------------------------------------------------------------ the memory (state adapter)

def test_memory_keeps_the_highest_seq_and_survives_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    m = state.PolicyMemory(path)
    m.record({"a": pol.SeenPolicy("o", "O", 5, "d5")})
    state.PolicyMemory(path).record({"a": pol.SeenPolicy("o", "O", 3, "d3"),
                                     "b": pol.SeenPolicy("o", "O", 1, "d1")})
    again = state.PolicyMemory(path)
    assert again.seen["a"].seq == 5 and again.seen["b"].seq == 1
    assert path.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".s.json.*"))  # no temporary files left behind
    path.write_text('{"version": 1, "vms": {"a": {"seq": 1}}}')
    broken = state.PolicyMemory(path)
    assert broken.problem and "damaged entry" in broken.problem
    broken.record({"c": pol.SeenPolicy("o", "O", 1, "d")})
    assert "seq" in path.read_text() and '"c"' not in path.read_text()  # evidence kept, nothing written


def _record_many(args: tuple[str, int]) -> None:
    path, worker = args
    for i in range(20):
        state.PolicyMemory(Path(path)).record({f"w{worker}-{i}": pol.SeenPolicy("o", "O", i, "d")})


def test_concurrent_consoles_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_record_many, [(str(path), w) for w in range(4)])
    seen = state.PolicyMemory(path).seen
    assert len(seen) == 80 and all(f"w{w}-{i}" in seen for w in range(4) for i in range(20))


def test_state_path_is_per_fleet_and_owner_roots(tmp_path: Path) -> None:
    a = state.state_path(tmp_path / "f.toml", ["r1"])
    assert a == state.state_path(tmp_path / "f.toml", ["r1"])
    assert a != state.state_path(tmp_path / "g.toml", ["r1"])
    assert a != state.state_path(tmp_path / "f.toml", ["r2"])
    assert str(a).startswith(str(state.state_dir()))


# ------------------------------------------------------------------ through the service and the CLI

def test_rollback_is_refused_across_console_runs(tmp_path: Path, kit: Kit) -> None:
    files = build_fleet(tmp_path, kit)
    policy_file = tmp_path / "policies" / "web-1.jws"
    old = policy_file.read_text()
    assert FleetService.load(files.fleet, at=T0).policy("web-1").valid
    newer = policy(kit, kit.alice, int(T0.timestamp()) + 10)  # the owner re-signs (higher seq)
    policy_file.write_text(newer)
    first = FleetService.load(files.fleet, at=T0)
    assert first.policy("web-1").valid
    first.matrix()  # the console looks at the fleet: the newer policy is remembered
    policy_file.write_text(old)  # someone puts the old policy back
    second = FleetService.load(files.fleet, at=T0)
    assert [r.code for r in second.policy("web-1").reasons] == ["policy.rollback"]
    r = CliRunner().invoke(main, ["explain", "--fleet", str(files.fleet), "--offline",
                                  "--at", T0.isoformat(), "--json", "web-1", "hv-fr-1"])
    assert r.exit_code == 1 and "policy.rollback" in {x["code"] for x in json.loads(r.stdout)["reasons"]}


def test_metadata_conflict_is_loud(tmp_path: Path, kit: Kit) -> None:
    files = build_fleet(tmp_path, kit)
    svc = FleetService.load(files.fleet, at=T0)
    assert svc.policy("web-1").valid
    other = policy(kit, kit.alice, int(T0.timestamp()) + 50, country="FR")
    dom = DomainFacts(uuid=VM, name="web-1", state="running", policy_token=other)
    svc.apply_facts("hv-de-1", HostFacts("hv-de-1", 4096, 2, 2048, (dom,)), None)
    pr = svc.policy("web-1")
    assert not pr.valid and pr.reasons[0].code == "policy.conflict"
    assert "differs from" in pr.reasons[0].message and pr.reasons[0].fix
    assert [p.reason.code for p in svc.problems].count("policy.conflict") == 1
    d = svc.explain("web-1", "hv-fr-1")
    assert not d.allowed and "policy.conflict" in {r.code for r in d.reasons}
    # the same token in both places: no conflict, and the problem goes away
    same = DomainFacts(uuid=VM, name="web-1", state="running",
                       policy_token=(tmp_path / "policies" / "web-1.jws").read_text().strip())
    svc.apply_facts("hv-de-1", HostFacts("hv-de-1", 4096, 2, 2048, (same,)), None)
    assert svc.policy("web-1").valid
    assert "policy.conflict" not in [p.reason.code for p in svc.problems]


def test_cli_handover_flow(tmp_path: Path, kit: Kit) -> None:
    """Alice hands web-1 to Bob with the CLI; Bob signs with --handover; escort accepts it."""
    files = build_fleet(tmp_path, kit)
    run = CliRunner().invoke
    svc = FleetService.load(files.fleet, at=T0)
    svc.matrix()  # Alice's policy is remembered
    bob_key, bob_cert = tmp_path / "bob-key.pem", tmp_path / "bob-cert.pem"
    bob_key.write_bytes(iss.key_pem(kit.bob.key))
    bob_cert.write_bytes(iss.cert_pem(kit.bob.cert))
    ca = tmp_path / "trust" / "owners" / "owners-ca.pem"
    start = (T0 - dt.timedelta(hours=1)).isoformat()
    h = run(main, ["policy", "handover", "--key", str(files.alice_key), "--cert", str(files.alice_cert),
                   "--vm-uuid", VM, "--to-cert", str(bob_cert), "--to-ca", str(ca), "--start", start,
                   "--out", str(tmp_path / "handover.jws")])
    assert h.exit_code == 0, h.output
    common = ["policy", "sign", "--key", str(bob_key), "--cert", str(bob_cert), "--vm-uuid", VM,
              "--trust-ca", f"EU={fp(kit.eu.cert)}", "--require", "country=DE", "--start", start]
    without = run(main, [*common, "--out", str(tmp_path / "bob-no.jws")])
    with_h = run(main, [*common, "--handover", str(tmp_path / "handover.jws"),
                        "--out", str(tmp_path / "bob.jws")])
    assert without.exit_code == 0 and with_h.exit_code == 0, with_h.output
    policy_file = tmp_path / "policies" / "web-1.jws"
    policy_file.write_bytes((tmp_path / "bob-no.jws").read_bytes())
    assert [r.code for r in FleetService.load(files.fleet, at=T0).policy("web-1").reasons] == \
        ["policy.owner_changed"]
    policy_file.write_bytes((tmp_path / "bob.jws").read_bytes())
    assert FleetService.load(files.fleet, at=T0).policy("web-1").valid
    # a hand-over naming a certificate the CA did not issue is refused at the command line
    root = tmp_path / "trust" / "hosts" / "root.pem"
    bad = run(main, ["policy", "handover", "--key", str(files.alice_key), "--cert", str(files.alice_cert),
                     "--vm-uuid", VM, "--to-cert", str(bob_cert), "--to-ca", str(root),
                     "--out", str(tmp_path / "x.jws")])
    assert bad.exit_code == 2 and "not the CA that issued" in bad.stderr
