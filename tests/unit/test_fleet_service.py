"""FleetService: problems instead of exceptions for the UI, facts from a refresh, read-only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from console.core.envelope import token_digest
from console.core.errors import InputError, ReadOnlyError
from console.core.inventory import DomainFacts, HostFacts
from console.core.issuance import cert_pem
from console.core.policy import policy_metadata_xml
from console.core.reasons import Reason
from console.services.fleet import FleetService
from tests.unit.trustkit import DB_UUID, T0, WEB_UUID, FleetFiles, build_fleet, fp, host_cert


@pytest.fixture()
def fleet(tmp_path: Path) -> FleetFiles:
    return build_fleet(tmp_path)


def test_views_and_matrix_agree_with_targets(fleet: FleetFiles) -> None:
    s = FleetService.load(fleet.fleet, at=T0)
    assert s.problems == [] and s.kind == "lab" and s.name == "test fleet"
    vms = {v.name: v for v in s.vms()}
    assert vms["web-1"].allowed_targets == ("hv-fr-1",)
    assert vms["web-1"].owner == "Alice <alice@example.org>"
    for v in vms.values():
        allowed = tuple(sorted(d.host for d in s.targets(v.uuid) if d.allowed))
        assert allowed == tuple(sorted(v.allowed_targets))
    assert s.dependants(fp(fleet.kit.eu.cert)) == (3, 1)
    assert s.dependants(fp(fleet.kit.root.cert)) == (4, 1)
    assert [a.id for a in s.admins] == ["anne", "bert"]
    # what the audit log records: the policy and grant a decision rested on
    d = s.explain("web-1", "hv-fr-1", "anne")
    assert d.allowed and d.vm_uuid == WEB_UUID
    assert d.policy_digest == s.policy("web-1").digest == token_digest(s.policy_token(WEB_UUID))
    assert len(d.grant_digest) == 64
    assert s.explain("web-1", "hv-fr-1").grant_digest == ""
    policy_hash, grant_id = s.audit_ids("web-1", "anne")
    assert policy_hash == d.policy_digest
    (grant,) = s.grant_results()
    assert grant.grant is not None and grant_id == grant.grant.jti != ""
    assert s.audit_ids("web-1", "bert") == (d.policy_digest, "")  # bert holds no grant
    assert s.audit_ids("db-1", "anne")[1] == ""  # anne's grant names web-1 only


def test_missing_fleet_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    s = FleetService.load(tmp_path / "nope.toml")
    assert s.hosts() == [] and s.vms() == []
    assert s.problems and "no such fleet file" in s.problems[0].reason.message
    with pytest.raises(InputError):
        FleetService.load_strict(tmp_path / "nope.toml")


def test_bad_files_become_problems_where_they_belong(fleet: FleetFiles) -> None:
    (fleet.root / "certs" / "hv-fr-1.pem").write_text("not a certificate")
    (fleet.root / "policies" / "db-1.jws").unlink()
    shutil.rmtree(fleet.root / "trust" / "owners")
    (fleet.root / "trust" / "owners").mkdir()
    s = FleetService.load(fleet.fleet, at=T0)
    codes = {p.reason.code for p in s.problems}
    assert {"cert.unreadable", "policy.unreadable", "trust.unusable"} <= codes
    fr = next(h for h in s.hosts() if h.name == "hv-fr-1")
    assert fr.cert_problem is not None and fr.chain is None
    d = s.explain("web-1", "hv-fr-1")
    assert "host.no_certificate" in [r.code for r in d.reasons]
    assert "policy.owner_untrusted" in [r.code for r in d.reasons]  # no owners' store at all
    assert next(r.code for r in s.explain("db-1", "hv-de-1").reasons) == "policy.unreadable"
    with pytest.raises(InputError):
        FleetService.load_strict(fleet.fleet, at=T0)


def test_apply_facts_down_and_domains(fleet: FleetFiles) -> None:
    s = FleetService.load(fleet.fleet, at=T0)
    assert s.explain("web-1", "hv-fr-1").allowed
    s.apply_facts("hv-fr-1", None, Reason("ssh.unreachable", "host hv-fr-1 did not answer", "check it"))
    d = s.explain("web-1", "hv-fr-1")
    assert [r.code for r in d.reasons] == ["host.down"]
    assert next(v for v in s.vms() if v.name == "web-1").allowed_targets == ()
    # hv-fr-1 comes back; web-1 is now running there (migrated), and a new VM appears whose
    # policy comes from its domain XML metadata.
    token = (fleet.root / "policies" / "db-1.jws").read_text().strip()
    facts = HostFacts("hv-fr-1", 65536, 16, 32768, (
        DomainFacts(WEB_UUID, "web-1", "running"),
        DomainFacts(DB_UUID, "db-1", "running", policy_xml=policy_metadata_xml(token)),
        DomainFacts("11111111-2222-3333-4444-555555555555", "stray", "paused"),
    ))
    s.apply_facts("hv-fr-1", facts, None)
    views = {v.name: v for v in s.vms()}
    assert views["web-1"].host == "hv-fr-1" and views["web-1"].state == "running"
    assert views["web-1"].allowed_targets == ("hv-de-1",)  # it left hv-de-1, which is now a target
    assert s.explain("web-1", "hv-fr-1").reasons[0].code == "host.current"
    assert views["db-1"].host == "hv-fr-1"
    assert views["stray"].policy_problems[0].code == "policy.unsigned"
    # the next refresh no longer reports the stray VM: it is dropped; fleet-file VMs stay
    s.apply_facts("hv-fr-1", HostFacts("hv-fr-1", 1, 1, 1, ()), None)
    names = {v.name: v for v in s.vms()}
    assert "stray" not in names and names["web-1"].state == "unknown"


def test_apply_facts_new_certificate(fleet: FleetFiles) -> None:
    s = FleetService.load(fleet.fleet, at=T0)
    assert "attr.country" in [r.code for r in s.explain("db-1", "hv-fr-1").reasons]
    cert, _ = host_cert(fleet.kit.eu, "hv-fr-1", country="US")
    s.apply_facts("hv-fr-1", HostFacts("hv-fr-1", 1, 1, 1, (), cert_pem=cert_pem(cert)), None)
    assert s.explain("db-1", "hv-fr-1").allowed
    with pytest.raises(Exception, match="unknown host"):
        s.apply_facts("nope", None, None)


def test_readonly(fleet: FleetFiles) -> None:
    s = FleetService.load(fleet.fleet, readonly=True, at=T0)
    with pytest.raises(ReadOnlyError, match="migrate"):
        s.require_writable("migrate")
    FleetService.load(fleet.fleet, at=T0).require_writable("migrate")


def test_parallel_open_matches_in_process(fleet: FleetFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime as dt

    from console.core import policy as pol
    from console.core.envelope import TYP_POLICY
    from console.services import fleet as svc

    kit = fleet.kit
    tokens = []
    for i in range(12):
        u = f"00000000-0000-4000-8000-{i:012d}"
        payload = pol.build_policy_payload(owner=kit.alice.email, vm_uuid=u, vm_name=f"v{i}",
                                           trusted_cas=[("EU", fp(kit.eu.cert))], require={"country": ["DE"]},
                                           not_before=T0 - dt.timedelta(days=1),
                                           not_after=T0 + dt.timedelta(days=1))
        tokens.append((u, pol.sign_policy(payload, kit.alice.key, kit.alice.chain)))
    h, p, s = tokens[3][1].split(".")
    bad = "QQQQ" if s.endswith("AAAA") else "AAAA"  # always other bytes (both canonical base64)
    tokens[3] = (tokens[3][0], f"{h}.{p}.{s[:-4]}{bad}")  # one tampered token
    assert tokens[3][1].rsplit(".", 1)[1] != s
    tokens.append((DB_UUID, tokens[0][1]))  # one attached to the wrong VM
    store = FleetService.load(fleet.fleet, at=T0).owners
    monkeypatch.setattr(svc, "PARALLEL_MIN_TOKENS", 1)
    par = pol.PolicyBook(store)
    assert svc.open_tokens_parallel(par.envelopes, (t for _, t in tokens), TYP_POLICY, pol.POLICY_FIELDS,
                                    workers=2) == len(tokens) - 1
    seq = pol.PolicyBook(store)
    got, want = par.verify_many(tokens, T0), seq.verify_many(tokens, T0)
    assert got == want
    assert [r.code for r in got[tokens[3][0]].reasons] == ["policy.signature"]
    assert [r.code for r in got[DB_UUID].reasons] == ["policy.vm_mismatch"]
    assert sum(r.valid for r in got.values()) == 11


def test_lazy_load_checks_only_what_is_asked(fleet: FleetFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    from console.core.pki import TrustStore

    calls: list[str] = []
    real = TrustStore.verify_host

    def spy(self: TrustStore, cert: object, at: object, **kw: object) -> object:
        calls.append(str(cert.subject.rfc4514_string()))  # type: ignore[attr-defined]
        return real(self, cert, at, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(TrustStore, "verify_host", spy)
    lazy = FleetService.load_strict(fleet.fleet, at=T0)
    assert calls == []
    assert lazy.explain("web-1", "hv-fr-1").allowed
    assert len(calls) == 1 and "hv-fr-1" in calls[0]
    assert all(h.chain is not None for h in lazy.hosts())  # views fill in on demand
    calls.clear()
    eager = FleetService.load(fleet.fleet, at=T0)
    assert len(calls) == 4
    eager_valid = [h.chain.valid for h in eager.hosts() if h.chain]
    assert eager_valid == [h.chain.valid for h in lazy.hosts() if h.chain]
    assert len(calls) == 4  # views at the load time were checked once


def test_damaged_certificates_are_one_line_errors(fleet: FleetFiles) -> None:
    """Byte-level damage to certificates never escapes as anything but InputError."""
    import random

    from cryptography.hazmat.primitives import serialization

    from console.core.pki import load_certificates

    der = fleet.kit.alice.cert.public_bytes(serialization.Encoding.DER)
    rng = random.Random(1)
    refused = 0
    for _ in range(400):
        b = bytearray(der)
        b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            load_certificates(bytes(b), "x.der")
        except InputError as exc:
            refused += 1
            assert "\n" not in str(exc)
    assert refused > 50
