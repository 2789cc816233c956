"""Property: escort's verdict and cryptography's x509.verification agree where both can judge.

Chains are generated (root -> 0..2 intermediates -> host) with random validity
windows, name constraints (exact-domain and excluded DNS subtrees), basicConstraints
CA on the intermediates, pathLen and key types. Every CA publishes a fresh, empty CRL,
so revocation is known and never the difference. cryptography's verifier is a cross-
check here only (tests/unit/xcheck.py says where it cannot judge: Ed25519 keys,
leading-dot constraints); it is never part of escort's verdict.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from console.core import issuance as iss
from console.core.pki import TrustStore

from . import xcheck

AT = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
_KEYS: dict[str, list[iss.PrivateKey]] = {}


def _key(kind: str, i: int) -> iss.PrivateKey:
    pool = _KEYS.setdefault(kind, [])
    while len(pool) <= i:
        pool.append(iss.make_key(kind))
    return pool[i]


def _cert(subject: str, key: iss.PrivateKey, issuer_name: str, issuer_key: iss.PrivateKey, *,
          ca: bool, path_len: int | None, days: tuple[int, int], dns: str | None,
          permitted: list[str], excluded: list[str]) -> x509.Certificate:
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(AT + dt.timedelta(days=days[0])).not_valid_after(AT + dt.timedelta(days=days[1]))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len if ca else None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                        critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                            critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                            critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                   ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    if dns is not None:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    if permitted or excluded:
        b = b.add_extension(x509.NameConstraints(
            permitted_subtrees=[x509.DNSName(d) for d in permitted] or None,
            excluded_subtrees=[x509.DNSName(d) for d in excluded] or None), critical=True)
    algo = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(issuer_key, algo)


DOMAINS = ["a.example", "b.example", "x.a.example", "example"]
HOSTS = ["h.a.example", "h.b.example", "h.x.a.example", "a.example", "h.other.test"]
window = st.sampled_from([(-30, 365), (-30, 365), (-30, 365), (-400, -1), (10, 400)])
ca_spec = st.fixed_dictionaries({
    "ca": st.sampled_from([True, True, True, False]),
    "path_len": st.sampled_from([None, None, 0, 1]),
    "days": window,
    "permitted": st.lists(st.sampled_from(DOMAINS), max_size=2, unique=True),
    "excluded": st.lists(st.sampled_from(DOMAINS), max_size=1),
    "kind": st.sampled_from(["ec", "ec", "ec", "rsa", "ed25519"]),
})


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(root_kind=st.sampled_from(["ec", "ec", "rsa", "ed25519"]), mids=st.lists(ca_spec, max_size=2),
       leaf_days=window, leaf_dns=st.sampled_from(HOSTS),
       leaf_kind=st.sampled_from(["ec", "ec", "rsa", "ed25519"]))
def test_escort_and_cryptography_agree_where_both_judge(
        root_kind: str, mids: list[dict[str, object]], leaf_days: tuple[int, int], leaf_dns: str,
        leaf_kind: str) -> None:
    root_key = _key(root_kind, 0)
    root = _cert("Root", root_key, "Root", root_key, ca=True, path_len=None, days=(-100, 3000), dns=None,
                 permitted=[], excluded=[])
    certs, crls = [("root.pem", iss.cert_pem(root))], []
    issuer_name, issuer_key = "Root", root_key
    inters: list[x509.Certificate] = []
    for i, m in enumerate(mids):
        k = _key(str(m["kind"]), i + 1)
        c = _cert(f"Mid {i}", k, issuer_name, issuer_key, ca=bool(m["ca"]),
                  path_len=m["path_len"],  # type: ignore[arg-type]
                  days=m["days"], dns=None, permitted=list(m["permitted"]),  # type: ignore[arg-type]
                  excluded=list(m["excluded"]))  # type: ignore[call-overload]
        inters.append(c)
        certs.append((f"mid{i}.pem", iss.cert_pem(c)))
        crls.append((f"mid{i}.crl", iss.crl_pem(iss.issue_crl(
            iss.Issuer(c, k), [], iss.Validity(AT - dt.timedelta(days=1), AT + dt.timedelta(days=30))))))
        issuer_name, issuer_key = f"Mid {i}", k
    fresh = iss.Validity(AT - dt.timedelta(days=1), AT + dt.timedelta(days=30))
    crls.append(("root.crl", iss.crl_pem(iss.issue_crl(iss.Issuer(root, root_key), [], fresh))))
    leaf = _cert("host", _key(leaf_kind, 9), issuer_name, issuer_key, ca=False, path_len=None,
                 days=leaf_days, dns=leaf_dns, permitted=[], excluded=[])
    store, _ = TrustStore.build(certs, crls, at=AT)
    ours = store.verify_host(leaf, AT)
    theirs = xcheck.judge(leaf, list(reversed(inters)), root, AT)
    if theirs is not None:
        assert ours.valid == theirs, [r.code for r in ours.reasons]
