"""Grants: one admin, named VMs, a time window, the VM owner's signature."""

from __future__ import annotations

import datetime as dt

import pytest

from console.core import grants as gr
from console.core import policy as pol
from console.core.errors import InputError
from tests.unit.trustkit import T0, Kit, fp, make_kit

VM_X = "6f1c1e1a-8d7b-4c36-9d61-2a3f6a0b9e11"
VM_Y = "0b8e5b8e-2f7a-4a4b-8a56-7f1e4e1c2d33"
KEY = "SHA256:" + "A" * 43
OTHER_KEY = "SHA256:" + "B" * 43
ANNE = gr.AdminRef("anne", KEY)


@pytest.fixture(scope="module")
def kit() -> Kit:
    return make_kit()


def grant_token(kit: Kit, *, owner: str = "alice", admin: gr.AdminRef = ANNE, vms: tuple[str, ...] = (VM_X,),
                label: str = "", hours: float = 8, emergency: bool = False,
                start: dt.datetime | None = None) -> str:
    o = getattr(kit, owner)
    start = start or T0 - dt.timedelta(hours=1)
    payload = gr.build_grant_payload(owner=o.email, admin=admin, vms=vms, label=label, not_before=start,
                                     not_after=start + dt.timedelta(hours=hours), emergency_only=emergency)
    return gr.sign_grant(payload, o.key, o.chain)


def policy_owner(kit: Kit, owner: str = "alice") -> pol.OwnerIdentity:
    o = getattr(kit, owner)
    payload = pol.build_policy_payload(owner=o.email, vm_uuid=VM_X, vm_name="x",
                                       trusted_cas=[("EU", fp(kit.eu.cert))], require={},
                                       not_before=T0 - dt.timedelta(days=1),
                                       not_after=T0 + dt.timedelta(days=1))
    r = pol.PolicyBook(kit.owners).verify(pol.sign_policy(payload, o.key, o.chain), T0)
    assert r.owner is not None
    return r.owner


def check(kit: Kit, token: str, *, admin: gr.AdminRef = ANNE, vm: str = VM_X, at: dt.datetime = T0,
          owner: str = "alice", labels: tuple[str, ...] = (), emergency: bool = False) -> set[str]:
    res = gr.GrantBook(kit.owners).verify(token, at)
    return {r.code for r in gr.check_grant(res, admin=admin, vm_uuid=vm, vm_labels=labels,
                                           policy_owner=policy_owner(kit, owner), emergency=emergency)}


def test_valid_grant(kit: Kit) -> None:
    assert check(kit, grant_token(kit)) == set()


def test_grant_for_x_never_authorises_y(kit: Kit) -> None:
    assert check(kit, grant_token(kit), vm=VM_Y) == {"grant.wrong_vm"}


def test_wrong_admin_and_wrong_key(kit: Kit) -> None:
    tok = grant_token(kit)
    assert check(kit, tok, admin=gr.AdminRef("bert", KEY)) == {"grant.wrong_admin"}
    assert check(kit, tok, admin=gr.AdminRef("anne", OTHER_KEY)) == {"grant.wrong_admin"}


def test_time_window(kit: Kit) -> None:
    tok = grant_token(kit, hours=2)
    assert check(kit, tok, at=T0 + dt.timedelta(hours=3)) == {"grant.expired"}
    assert check(kit, tok, at=T0 - dt.timedelta(hours=3)) == {"grant.not_yet_valid"}


def test_owner_mismatch(kit: Kit) -> None:
    # Bob (a trusted owner) cannot grant access to Alice's VM.
    assert check(kit, grant_token(kit, owner="bob")) == {"grant.owner_mismatch"}


def test_untrusted_signer_and_tampering(kit: Kit) -> None:
    assert "grant.owner_untrusted" in check(kit, grant_token(kit, owner="mallory"))
    h, p, s = grant_token(kit).split(".")
    tampered = f"{h}.{p}.{s[:-4]}AAAA"
    assert check(kit, tampered) == {"grant.signature"}


def test_label_scope_comes_from_policy_labels(kit: Kit) -> None:
    tok = grant_token(kit, vms=(), label="web")
    assert check(kit, tok, labels=("web",)) == set()
    assert check(kit, tok, labels=()) == {"grant.wrong_vm"}


def test_emergency_only(kit: Kit) -> None:
    tok = grant_token(kit, emergency=True)
    assert check(kit, tok) == {"grant.emergency_only"}
    assert check(kit, tok, emergency=True) == set()


def test_authorise_picks_a_matching_grant_and_reports_only_this_admins(kit: Kit) -> None:
    book = gr.GrantBook(kit.owners)
    results = [book.verify(grant_token(kit, vms=(VM_Y,)), T0),
               book.verify(grant_token(kit, admin=gr.AdminRef("bert", OTHER_KEY)), T0)]
    used, why = gr.authorise(results, admin=ANNE, vm_uuid=VM_X, policy_owner=policy_owner(kit))
    assert used is None and [r.code for r in why] == ["grant.wrong_vm"]
    results.append(book.verify(grant_token(kit), T0))
    used, why = gr.authorise(results, admin=ANNE, vm_uuid=VM_X, policy_owner=policy_owner(kit))
    assert used is results[-1] and why == []
    used, why = gr.authorise(results, admin=gr.AdminRef("carl", KEY), vm_uuid=VM_X,
                             policy_owner=policy_owner(kit))
    assert [r.code for r in why] == ["grant.missing"]


def test_broken_grant_is_attributed_to_its_claimed_admin(kit: Kit) -> None:
    h, p, s = grant_token(kit).split(".")
    res = gr.GrantBook(kit.owners).verify(f"{h}.{p}.{s[:-4]}AAAA", T0)
    assert res.claimed_admin == "anne" and res.grant is None
    _, why = gr.authorise([res], admin=ANNE, vm_uuid=VM_X, policy_owner=policy_owner(kit))
    assert [r.code for r in why] == ["grant.signature"]


def test_build_refusals() -> None:
    base = {"owner": "a", "not_before": T0, "not_after": T0 + dt.timedelta(hours=1)}
    with pytest.raises(InputError):
        gr.build_grant_payload(admin=gr.AdminRef("x"), vms=(VM_X,), **base)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        gr.build_grant_payload(admin=ANNE, **base)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        gr.build_grant_payload(admin=gr.AdminRef("x", "SHA256:short"), vms=(VM_X,), **base)  # type: ignore[arg-type]


def test_second_owners_ca_minting_the_same_email_cannot_grant(kit: Kit) -> None:
    """Two owners' CAs, both trusted; the second certifies its own "alice@example.org".

    With the real trust store both certificates verify, and the e-mail is the same,
    but the owner is the issuing CA plus the e-mail: the impostor's grant is refused.
    """
    from console.core import issuance as iss
    from console.core.pki import TrustStore
    from tests.unit.trustkit import _owner

    store, problems = TrustStore.build([("owners.pem", iss.cert_pem(kit.owners_ca.cert)),
                                        ("second.pem", iss.cert_pem(kit.rogue_owners_ca.cert))], [], at=T0,
                                       missing_crl="warn")
    assert problems == []
    impostor = _owner("Alice", "alice@example.org", "ec", kit.rogue_owners_ca)
    payload = pol.build_policy_payload(owner=kit.alice.email, vm_uuid=VM_X, vm_name="x",
                                       trusted_cas=[("EU", fp(kit.eu.cert))], require={},
                                       not_before=T0 - dt.timedelta(days=1),
                                       not_after=T0 + dt.timedelta(days=1))
    policy = pol.PolicyBook(store).verify(pol.sign_policy(payload, kit.alice.key, kit.alice.chain), T0)
    assert policy.valid and policy.owner is not None and policy.owner.issuer == "Owners CA"

    def grant_by(signer: object) -> gr.GrantResult:
        p = gr.build_grant_payload(owner="alice@example.org", admin=ANNE, vms=[VM_X],
                                   not_before=T0 - dt.timedelta(hours=1),
                                   not_after=T0 + dt.timedelta(hours=8))
        token = gr.sign_grant(p, signer.key, signer.chain)  # type: ignore[attr-defined]
        return gr.GrantBook(store).verify(token, T0)

    forged, real = grant_by(impostor), grant_by(kit.alice)
    assert forged.valid and real.valid  # both chain to a trusted owners' CA
    assert forged.owner is not None and forged.owner.email == policy.owner.email  # same e-mail
    why = gr.check_grant(forged, admin=ANNE, vm_uuid=VM_X, policy_owner=policy.owner)
    assert [r.code for r in why] == ["grant.owner_mismatch"]
    assert "Rogue Owners CA" in why[0].message and "Owners CA" in why[0].message
    assert gr.check_grant(real, admin=ANNE, vm_uuid=VM_X, policy_owner=policy.owner) == []
    # a certificate renewed by the same CA (new key, same e-mail) is still Alice
    renewed = _owner("Alice", "alice@example.org", "ed25519", kit.owners_ca)
    assert gr.check_grant(grant_by(renewed), admin=ANNE, vm_uuid=VM_X, policy_owner=policy.owner) == []


def test_unverified_signer_is_nobody(kit: Kit) -> None:
    r = gr.GrantBook(None).verify(grant_token(kit), T0)
    assert r.owner is not None and r.owner.key == ""
    assert not r.owner.same_owner(r.owner)


def test_a_grant_bound_only_to_a_certificate_authorises_nobody(kit: Kit) -> None:
    """Probe2: escort proves an admin by SSH key only; ``cert_fingerprint`` is the fleet file's word.

    On the lab, an operator holding only their own key listed it as admin "anne" in the
    fleet file, copied the certificate fingerprint of alice's cert-only grant for anne
    into ``cert_fingerprint`` and migrated app-1 with it (exit 0). A grant must bind the
    SSH key that the proof of possession checks.
    """
    from console.core import envelope as env

    cert = "ab" * 32
    payload = {"ver": 1, "iss": kit.alice.email, "jti": "g-cert", "iat": int(T0.timestamp()) - 3600,
               "nbf": int(T0.timestamp()) - 3600, "exp": int(T0.timestamp()) + 3600,
               "admin": {"id": "anne", "cert_sha256": cert}, "vms": [VM_X]}
    # signed by an older escort, or by another tool
    token = env.sign_raw(payload, env.TYP_GRANT, kit.alice.key, kit.alice.chain)
    mallory_as_anne = gr.AdminRef("anne", OTHER_KEY, cert)  # the fleet file: her own key, the grant's cert
    assert check(kit, token, admin=mallory_as_anne) == {"grant.no_ssh_key"}
    with pytest.raises(InputError):
        gr.sign_grant(payload, kit.alice.key, kit.alice.chain)
    with pytest.raises(InputError, match="--admin-key-fp"):
        gr.build_grant_payload(owner="a", admin=gr.AdminRef("anne", cert_sha256=cert), vms=(VM_X,),
                               not_before=T0, not_after=T0 + dt.timedelta(hours=1))
    # bound to both: the SSH key decides, the certificate can only narrow
    both = grant_token(kit, admin=gr.AdminRef("anne", KEY, cert))
    assert check(kit, both, admin=gr.AdminRef("anne", KEY, cert)) == set()
    assert check(kit, both, admin=mallory_as_anne) == {"grant.wrong_admin"}


def test_an_untrusted_signer_is_not_also_told_it_is_the_wrong_owner(kit: Kit) -> None:
    """Probe2 (lab, bob's certificate revoked): the grant was refused with owner_untrusted *and*
    "grant.owner_mismatch: the grant is signed by bob, but the VM belongs to bob"."""
    import dataclasses

    from console.core.envelope import reason

    owner = policy_owner(kit)
    good = gr.GrantBook(kit.owners).verify(grant_token(kit), T0)
    assert good.owner is not None
    unvouched = dataclasses.replace(good.owner, issuer="", issuer_key="")  # what an untrusted chain leaves
    bad = dataclasses.replace(good, owner=unvouched, reasons=(reason(
        "grant.owner_untrusted", "The signer alice is not a trusted owner: alice was revoked", "renew"),))
    codes = [r.code for r in gr.check_grant(bad, admin=ANNE, vm_uuid=VM_X, policy_owner=owner)]
    assert codes == ["grant.owner_untrusted"]
    # a trusted signer of another owner is still the wrong owner
    assert check(kit, grant_token(kit, owner="bob")) >= {"grant.owner_mismatch"}
