"""Decisions: every failing check reported, the walkthrough, and fast matrix == per-pair path."""

from __future__ import annotations

import datetime as dt
import random
import uuid

import pytest

from console.core import grants as gr
from console.core import policy as pol
from console.core.decisions import (
    HostCheck,
    VMCheck,
    allowed_matrix,
    allowed_per_pair,
    allowed_targets,
    decide,
)
from console.core.issuance import cert_pem
from console.core.pki import TrustStore, host_attributes
from tests.unit.trustkit import T0, Kit, crl_files, fp, host_cert, make_kit

KEY = "SHA256:" + "A" * 43
ANNE = gr.AdminRef("anne", KEY)


@pytest.fixture(scope="module")
def kit() -> Kit:
    return make_kit()


@pytest.fixture(scope="module")
def store(kit: Kit) -> TrustStore:
    certs = [(n, cert_pem(c.cert)) for n, c in (("root", kit.root), ("eu", kit.eu), ("us", kit.us))]
    s, problems = TrustStore.build(certs, crl_files(kit), at=T0)
    assert not [p for p in problems if p.reason.severity == "error"]
    return s


def host(kit: Kit, store: TrustStore, name: str, region: str = "eu", **kw: object) -> HostCheck:
    cert, _ = host_cert(getattr(kit, region), name, **kw)  # type: ignore[arg-type]
    return HostCheck.prepare(name, store.verify_host(cert, T0), host_attributes(cert))


def vm(kit: Kit, *, trust: str = "eu", require: dict[str, list[str]] | None = None, current: str = "h0",
       owner: str = "alice", labels: tuple[str, ...] = (), vm_uuid: str | None = None,
       book: pol.PolicyBook | None = None) -> VMCheck:
    o = getattr(kit, owner)
    u = vm_uuid or str(uuid.uuid4())
    ca = getattr(kit, trust)
    payload = pol.build_policy_payload(
        owner=o.email, vm_uuid=u, vm_name=f"vm-{u[:4]}", trusted_cas=[(f"Region {trust}", fp(ca.cert))],
        require=require if require is not None else {"country": ["DE", "FR"], "policies": ["assurance:high"]},
        not_before=T0 - dt.timedelta(days=1), not_after=T0 + dt.timedelta(days=30), labels=labels)
    token = pol.sign_policy(payload, o.key, o.chain)
    result = (book or pol.PolicyBook(kit.owners)).verify(token, T0, vm_uuid=u)
    return VMCheck.prepare(u, f"vm-{u[:4]}", current, result)


def codes(d: object) -> list[str]:
    return [r.code for r in d.reasons]  # type: ignore[attr-defined]


def test_allowed_with_walkthrough(kit: Kit, store: TrustStore) -> None:
    d = decide(vm(kit), host(kit, store, "h1"), at=T0)
    assert d.allowed and codes(d) == []
    titles = [s.title for s in d.steps]
    assert titles == ["Owner's policy", "Trusted CA", "Intermediate", "Host certificate",
                      "Attributes matched", "Grant", "Host", "Verdict"]
    assert d.steps[1].ok is True and "Region eu" in d.steps[1].detail
    assert "Region EU" in d.steps[2].detail and "Test Root" in d.steps[2].detail
    j = d.as_json()
    assert j["allowed"] is True and j["at"].endswith("Z") and len(j["steps"]) == 8


def test_every_failure_is_reported(kit: Kit, store: TrustStore) -> None:
    # Wrong region CA, wrong country, missing policy, current host, and an expired cert.
    h = host(kit, store, "h0", region="us", country="US", policies=(),
             start=T0 - dt.timedelta(days=400), days=30)
    d = decide(vm(kit), h, at=T0)
    got = set(codes(d))
    assert {"ca.not_trusted", "attr.country", "attr.policy", "host.current"} <= got
    assert any(c.startswith("cert.") for c in got), got
    assert not d.allowed
    country = next(r for r in d.reasons if r.code == "attr.country")
    assert "US" in country.message and "DE or FR" in country.message and country.fix
    assert d.steps[-1].ok is False


def test_locality_and_org_requirements(kit: Kit, store: TrustStore) -> None:
    v = vm(kit, require={"locality": ["Paris"], "org": ["Other Org"]})
    d = decide(v, host(kit, store, "h1"), at=T0)
    assert sorted(codes(d)) == ["attr.locality", "attr.org"]


def test_trusting_the_root_admits_both_regions(kit: Kit, store: TrustStore) -> None:
    v = vm(kit, trust="root", require={})
    assert decide(v, host(kit, store, "h1", region="us", country="US"), at=T0).allowed
    v_eu = vm(kit, trust="eu", require={})
    assert codes(decide(v_eu, host(kit, store, "h1", region="us"), at=T0)) == ["ca.not_trusted"]


def test_policy_problems_and_down_host(kit: Kit, store: TrustStore) -> None:
    h = host(kit, store, "h1")
    v = vm(kit, owner="mallory")
    down = HostCheck(h.name, h.chain, h.attributes, "down", None, h.policy_oids)
    d = decide(v, down, at=T0)
    assert "policy.owner_untrusted" in codes(d) and "host.down" in codes(d)


def test_no_certificate(kit: Kit) -> None:
    d = decide(vm(kit), HostCheck.prepare("bare", None, None), at=T0)
    assert codes(d) == ["host.no_certificate"]


def test_grant_step(kit: Kit, store: TrustStore) -> None:
    v = vm(kit, labels=("db",))
    h = host(kit, store, "h1")
    book = gr.GrantBook(kit.owners)
    d = decide(v, h, at=T0, admin=ANNE, grants=[])
    assert codes(d) == ["grant.missing"]
    payload = gr.build_grant_payload(owner=kit.alice.email, admin=ANNE, label="db",
                                     not_before=T0 - dt.timedelta(hours=1),
                                     not_after=T0 + dt.timedelta(hours=1))
    g = book.verify(gr.sign_grant(payload, kit.alice.key, kit.alice.chain), T0)
    d = decide(v, h, at=T0, admin=ANNE, grants=[g])
    assert d.allowed and d.steps[5].ok is True and d.admin == "anne"
    other = vm(kit)
    assert codes(decide(other, h, at=T0, admin=ANNE, grants=[g])) == ["grant.wrong_vm"]


def test_fast_matrix_agrees_with_per_pair_on_random_fleets(kit: Kit, store: TrustStore) -> None:
    rng = random.Random(7)
    countries = ["DE", "FR", "US", "IT"]
    hosts = []
    for i in range(14):
        hosts.append(host(kit, store, f"h{i}", region=rng.choice(["eu", "us"]), country=rng.choice(countries),
                          locality=rng.choice(["Berlin", "Paris", "Austin"]),
                          policies=tuple(rng.sample(["assurance:high", "fips"], rng.randint(0, 2))),
                          start=T0 - dt.timedelta(days=rng.choice([10, 10, 10, 800]))))
    h = hosts[3]
    hosts[3] = HostCheck(h.name, h.chain, h.attributes, "down", None, h.policy_oids)
    hosts.append(HostCheck.prepare("nocert", None, None))
    book = pol.PolicyBook(kit.owners)
    vms = []
    for _ in range(40):
        req: dict[str, list[str]] = {}
        if rng.random() < 0.7:
            req["country"] = rng.sample(countries, rng.randint(1, 2))
        if rng.random() < 0.4:
            req["locality"] = rng.sample(["Berlin", "Paris", "Austin"], 1)
        if rng.random() < 0.5:
            req["policies"] = rng.sample(["assurance:high", "fips"], rng.randint(1, 2))
        vms.append(vm(kit, trust=rng.choice(["eu", "us", "root"]), require=req,
                      current=f"h{rng.randint(0, 13)}", owner=rng.choice(["alice", "alice", "mallory"]),
                      book=book))
    fast = allowed_matrix(vms, hosts)
    slow = allowed_per_pair(vms, hosts, at=T0)
    assert fast.targets == slow
    assert any(fast.targets.values()) and not all(fast.targets.values())
    assert fast.groups <= len(vms)
    assert all(allowed_targets(v, hosts) == slow[v.uuid] for v in vms[:10])


def test_warnings_do_not_refuse_and_chain_reasons_pass_through(kit: Kit) -> None:
    """ChainResult/HostAttributes built directly: a stale-CRL warning is shown but not a refusal."""
    from console.core.pki import ChainResult, HostAttributes
    from console.core.reasons import Reason

    attrs = HostAttributes("hx", "DE", None, "Berlin", "Escort Test", None, ("hx",), (), frozenset(
        {"assurance:high"}), T0 + dt.timedelta(days=30))
    stale = Reason("crl.stale", "The CRL of Region EU is past its nextUpdate.", "Publish a fresh CRL.",
                   "warning")
    ok_chain = ChainResult(True, (), (stale,), ca_fingerprints=frozenset({fp(kit.eu.cert)}))
    d = decide(vm(kit), HostCheck.prepare("hx", ok_chain, attrs), at=T0)
    assert d.allowed and [r.code for r in d.reasons] == ["crl.stale"]
    assert d.reasons[0].severity == "warning"
    revoked = Reason("cert.revoked", "Host certificate hx was revoked.", "Issue a new certificate.")
    bad_chain = ChainResult(False, (revoked,), ca_fingerprints=frozenset({fp(kit.eu.cert)}))
    d = decide(vm(kit), HostCheck.prepare("hx", bad_chain, attrs), at=T0)
    assert not d.allowed and codes(d) == ["cert.revoked"]
    step = next(s for s in d.steps if s.title == "Host certificate")
    assert step.ok is False and step.reasons == (revoked,)
    # the fast path agrees: an invalid chain is never a target, a warning is
    hosts = [HostCheck.prepare("good", ok_chain, attrs), HostCheck.prepare("bad", bad_chain, attrs)]
    m = allowed_matrix([vm(kit, current="elsewhere")], hosts)
    assert list(m.targets.values()) == [("good",)]


def test_synthetic_fleets_never_crash_and_paths_agree(kit: Kit) -> None:
    """Hosts and VMs built directly, in every odd state, for both paths."""
    from console.core.pki import ChainResult, HostAttributes
    from console.core.policy import PolicyResult
    from console.core.reasons import Reason

    rng = random.Random(11)
    fps = [fp(kit.root.cert), fp(kit.eu.cert), fp(kit.us.cert), "ab" * 32]
    book = pol.PolicyBook(kit.owners)
    hosts = []
    for i in range(30):
        attrs = None if rng.random() < 0.1 else HostAttributes(
            f"h{i}", rng.choice(["DE", "FR", None]), rng.choice(["BY", None]), rng.choice(["Berlin", None]),
            rng.choice(["Escort Test", None]), None, (), (),
            frozenset(rng.sample(["assurance:high", "fips", "1.2.3.4"], rng.randint(0, 2))),
            T0 + dt.timedelta(days=5))
        valid = rng.random() < 0.8
        chain = None if rng.random() < 0.1 else ChainResult(
            valid, () if valid or rng.random() < 0.3 else (Reason("cert.expired", "Expired."),),
            ca_fingerprints=frozenset(rng.sample(fps, rng.randint(0, 2))))
        problem = Reason("host.unreachable", "Did not answer.") if rng.random() < 0.1 else None
        state = rng.choice(["up", "down", "unknown"])
        hosts.append(HostCheck.prepare(f"h{i}", chain, attrs, reachability=state, problem=problem))
    vms = []
    for _ in range(25):
        req: dict[str, list[str]] = {}
        for key, values in (("country", ["DE", "FR"]), ("state", ["BY"]), ("locality", ["Berlin"]),
                            ("org", ["Escort Test"]), ("policies", ["assurance:high", "fips"])):
            if rng.random() < 0.3:
                req[key] = rng.sample(values, 1)
        v = vm(kit, trust=rng.choice(["root", "eu", "us"]), require=req, current=f"h{rng.randint(0, 29)}",
               book=book)
        if rng.random() < 0.1:
            v = VMCheck.prepare(v.uuid, v.name, v.current_host,
                                PolicyResult("", None, None, (Reason("policy.unsigned", "No policy."),)))
        vms.append(v)
    slow = allowed_per_pair(vms, hosts, at=T0)
    assert allowed_matrix(vms, hosts).targets == slow
    assert sum(map(len, slow.values())) >= 5 and not all(slow.values())  # not vacuous either way
    for v in vms[:5]:
        for h in hosts:
            d = decide(v, h, at=T0, admin=ANNE)
            assert not d.allowed and d.reasons and len(d.steps) == 8  # no grant given to anne
