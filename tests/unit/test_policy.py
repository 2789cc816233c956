"""Placement policies: signing, verification reasons, caching and the libvirt metadata element."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest

from console.core import envelope as env
from console.core import policy as pol
from console.core.errors import InputError
from tests.unit.trustkit import T0, Kit, fp, make_kit

VM = "6f1c1e1a-8d7b-4c36-9d61-2a3f6a0b9e11"
OTHER = "0b8e5b8e-2f7a-4a4b-8a56-7f1e4e1c2d33"


@pytest.fixture(scope="module")
def kit() -> Kit:
    return make_kit()


def make_token(kit: Kit, *, vm: str = VM, days: float = 30, start: dt.datetime | None = None,
               require: dict[str, list[str]] | None = None, owner: str = "alice") -> str:
    o = getattr(kit, owner)
    start = start or T0 - dt.timedelta(days=1)
    payload = pol.build_policy_payload(
        owner=o.email, vm_uuid=vm, vm_name="web-1", trusted_cas=[("Region EU", fp(kit.eu.cert))],
        require=require if require is not None else {"country": ["DE", "FR"], "policies": ["assurance:high"]},
        not_before=start, not_after=start + dt.timedelta(days=days), labels=["web"])
    return pol.sign_policy(payload, o.key, o.chain)


def test_valid_policy_parses(kit: Kit) -> None:
    r = pol.PolicyBook(kit.owners).verify(make_token(kit), T0, vm_uuid=VM)
    assert r.valid, r.reasons
    assert r.policy is not None
    assert r.policy.vm_uuid == VM and r.policy.labels == ("web",)
    assert r.policy.requirements.country == frozenset({"DE", "FR"})
    assert r.policy.requirements.trusted_cas == frozenset({fp(kit.eu.cert)})
    assert r.owner is not None and r.owner.email == "alice@example.org"
    assert len(r.digest) == 64


def test_vm_mismatch(kit: Kit) -> None:
    r = pol.PolicyBook(kit.owners).verify(make_token(kit), T0, vm_uuid=OTHER)
    assert [x.code for x in r.reasons] == ["policy.vm_mismatch"]
    assert not r.valid


def test_expired_and_not_yet_valid(kit: Kit) -> None:
    book = pol.PolicyBook(kit.owners)
    token = make_token(kit, days=2)
    assert [x.code for x in book.verify(token, T0 + dt.timedelta(days=5)).reasons] == ["policy.expired"]
    assert [x.code for x in book.verify(token, T0 - dt.timedelta(days=5)).reasons] == ["policy.not_yet_valid"]


def test_untrusted_owner_refused(kit: Kit) -> None:
    r = pol.PolicyBook(kit.owners).verify(make_token(kit, owner="mallory"), T0)
    assert [x.code for x in r.reasons] == ["policy.owner_untrusted"]


def test_unknown_requirement_refused(kit: Kit) -> None:
    o = kit.alice
    payload = pol.build_policy_payload(
        owner=o.email, vm_uuid=VM, vm_name="x", trusted_cas=[("EU", fp(kit.eu.cert))], require={},
        not_before=T0 - dt.timedelta(days=1), not_after=T0 + dt.timedelta(days=1))
    payload["require"] = {"planet": ["earth"]}
    r = pol.PolicyBook(kit.owners).verify(env.sign_raw(payload, env.TYP_POLICY, o.key, o.chain), T0)
    assert "policy.unknown_field" in {x.code for x in r.reasons} and r.policy is None


def test_verified_once_per_token(kit: Kit) -> None:
    book = pol.PolicyBook(kit.owners)
    token = make_token(kit)
    first = book.verify(token, T0, vm_uuid=VM)
    n = len(book.envelopes._opened)
    for _ in range(3):
        assert book.verify(token, T0, vm_uuid=VM) is first  # same time: the remembered result
    assert book.verify(token, T0 + dt.timedelta(days=60), vm_uuid=VM).reasons[0].code == "policy.expired"
    assert len(book.envelopes._opened) == n == 1


def test_verify_many(kit: Kit) -> None:
    book = pol.PolicyBook(kit.owners)
    toks = {str(uuid.uuid4()): None for _ in range(3)}
    items = [(u, make_token(kit, vm=u)) for u in toks]
    out = book.verify_many([*items, (OTHER, items[0][1])], T0)
    assert all(out[u].valid for u, _ in items)
    assert [r.code for r in out[OTHER].reasons] == ["policy.vm_mismatch"]


def test_parse_requirements() -> None:
    got = pol.parse_requirements(["country=de,FR", "site=Berlin", "policy=assurance:high", "country=IT"])
    assert got == {"country": ["DE", "FR", "IT"], "locality": ["Berlin"], "policies": ["assurance:high"]}
    for bad in ["planet=earth", "country", "country="]:
        with pytest.raises(InputError):
            pol.parse_requirements([bad])


def test_fingerprint_and_uuid_normalisation() -> None:
    hexfp = "AB" * 32
    assert pol.normalize_fingerprint("SHA256:" + ":".join(["AB"] * 32)) == hexfp.lower()
    with pytest.raises(InputError):
        pol.normalize_fingerprint("abc")
    with pytest.raises(InputError):
        pol.normalize_uuid("not-a-uuid")


def test_metadata_roundtrip(kit: Kit) -> None:
    token = make_token(kit)
    xml = pol.policy_metadata_xml(token)
    assert 'xmlns:escort="https://escort.dev/xmlns/policy/1"' in xml and xml.startswith("<escort:policy")
    assert pol.token_from_metadata_xml(xml) == token
    domain = f"<domain type='kvm'><name>x</name><metadata>{xml}</metadata></domain>"
    assert pol.token_from_metadata_xml(domain) == token
    assert pol.token_from_metadata_xml("<domain><metadata/></domain>") == ""


def test_metadata_as_libvirt_returns_it() -> None:
    # virDomainGetMetadata returns the element with the namespace bound to our prefix.
    xml = '<escort:policy xmlns:escort="https://escort.dev/xmlns/policy/1">a.b.c</escort:policy>'
    assert pol.token_from_metadata_xml(xml) == "a.b.c"


@pytest.mark.parametrize("xml", [
    '<!DOCTYPE x [<!ENTITY e "boom">]><x>&e;</x>',
    "<policy>unclosed",
    '<policy xmlns="https://other.example/">a.b.c</policy>',
    '<escort:policy xmlns:escort="https://escort.dev/xmlns/policy/1"><x/></escort:policy>',
])
def test_metadata_refusals(xml: str) -> None:
    with pytest.raises(InputError):
        pol.token_from_metadata_xml(xml)


def test_metadata_encode_refuses_non_token() -> None:
    with pytest.raises(InputError):
        pol.policy_metadata_xml("<script>")


def test_build_refuses_empty_trust_and_window() -> None:
    with pytest.raises(InputError):
        pol.build_policy_payload(owner="a", vm_uuid=VM, vm_name="", trusted_cas=[], require={},
                                 not_before=T0, not_after=T0 + dt.timedelta(days=1))
    with pytest.raises(InputError):
        pol.build_policy_payload(owner="a", vm_uuid=VM, vm_name="", trusted_cas=[("x", "ab" * 32)],
                                 require={}, not_before=T0, not_after=T0)


def test_owner_certificate_with_a_non_positive_serial_is_refused(kit: Kit, tmp_path: Path) -> None:
    """The owner's certificate in a policy's x5c, re-signed by the owners' CA with serial -3 by the
    ``openssl`` CLI (which allows it): refused as unusable, with the serial named (that no Python
    warning reaches the user is checked on real processes in test_pki_why)."""
    import subprocess

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from console.core import issuance as iss

    (tmp_path / "ca.pem").write_bytes(iss.cert_pem(kit.owners_ca.cert))
    (tmp_path / "ca.key").write_bytes(kit.owners_ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "alice.pem").write_bytes(iss.cert_pem(kit.alice.cert))
    (tmp_path / "alice.key").write_bytes(kit.alice.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for args in (["-x509toreq", "-in", "alice.pem", "-signkey", "alice.key", "-copy_extensions", "copy",
                  "-out", "alice.csr"],
                 ["-req", "-in", "alice.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "-3",
                  "-copy_extensions", "copy", "-days", "30", "-out", "neg.pem"]):
        subprocess.run(["openssl", "x509", *args], cwd=tmp_path, check=True, capture_output=True)
    neg = x509.load_pem_x509_certificate((tmp_path / "neg.pem").read_bytes())
    assert neg.serial_number == -3
    now = dt.datetime.now(dt.UTC)
    payload = pol.build_policy_payload(
        owner=kit.alice.email, vm_uuid=VM, vm_name="web-1", trusted_cas=[("Region EU", fp(kit.eu.cert))],
        require={"country": ["DE"]}, not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=9))
    with pytest.raises(InputError, match="serial number -3 is not positive"):
        pol.sign_policy(payload, kit.alice.key, [neg])  # escort will not sign with it...
    token = env.sign_raw(payload, pol.TYP_POLICY, kit.alice.key, [neg])  # ...another tool might
    at = now + dt.timedelta(minutes=1)  # (openssl starts the certificates below at the second they are made)
    r = pol.PolicyBook(kit.owners).verify(token, at, vm_uuid=VM)
    assert not r.valid
    assert any("serial number -3 is not positive" in x.message for x in r.reasons), r.reasons
    # the same certificate with a positive serial (same steps, same dates) is accepted
    subprocess.run(["openssl", "x509", "-req", "-in", "alice.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-set_serial", "3", "-copy_extensions", "copy", "-days", "30", "-out", "pos.pem"],
                   cwd=tmp_path, check=True, capture_output=True)
    pos = x509.load_pem_x509_certificate((tmp_path / "pos.pem").read_bytes())
    good = pol.PolicyBook(kit.owners).verify(pol.sign_policy(payload, kit.alice.key, [pos]), at, vm_uuid=VM)
    assert good.valid, good.reasons
