"""The signed envelope: every way a token can be wrong gets its own stable code."""

from __future__ import annotations

import base64
import datetime as dt
import json
import warnings

import pytest

from console.core import envelope as env
from console.core.errors import InputError
from tests.unit.trustkit import T0, Kit, make_kit

FIELDS = frozenset({"vm_uuid"})


@pytest.fixture(scope="module")
def kit() -> Kit:
    return make_kit()


def payload(iss: str = "alice@example.org", **extra: object) -> dict[str, object]:
    base: dict[str, object] = {"ver": 1, "iss": iss, "jti": "j1", "nbf": int(T0.timestamp()) - 60,
                               "exp": int(T0.timestamp()) + 3600, "vm_uuid": "x"}
    base.update(extra)
    return base


def b64u(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def codes(v: env.Verified) -> set[str]:
    return {r.code for r in v.reasons}


def verify(kit: Kit, token: str, at: dt.datetime = T0, typ: str = env.TYP_POLICY) -> env.Verified:
    return env.EnvelopeVerifier(kit.owners).verify(token, typ, FIELDS, at)


@pytest.mark.parametrize("who", ["alice", "bob", "carol"])
def test_roundtrip_each_key_type(kit: Kit, who: str) -> None:
    owner = getattr(kit, who)
    token = env.sign(payload(owner.email), env.TYP_POLICY, owner.key, owner.chain, fields=FIELDS)
    header, _ = env.decode_unverified(token)
    assert header["alg"] == {"alice": "ES256", "bob": "RS256", "carol": "EdDSA"}[who]
    assert header["typ"] == "escort-policy+jwt"
    assert base64.b64decode(header["x5c"][0]) == owner.cert.public_bytes(
        __import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER)
    v = verify(kit, token)
    assert v.valid, v.reasons
    assert v.owner is not None and v.owner.email == owner.email
    assert v.payload is not None and v.payload["vm_uuid"] == "x"


def test_tampered_payload_is_a_signature_failure(kit: Kit) -> None:
    token = env.sign_raw(payload(), env.TYP_POLICY, kit.alice.key, kit.alice.chain)
    h, _p, s = token.split(".")
    forged = base64.urlsafe_b64encode(json.dumps(payload(vm_uuid="y")).encode()).decode().rstrip("=")
    v = verify(kit, f"{h}.{forged}.{s}")
    assert codes(v) == {"policy.signature"} and not v.valid


def test_wrong_signer_key_with_someone_elses_chain(kit: Kit) -> None:
    # Bob's key, Alice's certificate in x5c: sign() refuses, and a hand-made one fails.
    with pytest.raises(InputError):
        env.sign_raw(payload(), env.TYP_POLICY, kit.bob.key, kit.alice.chain)
    good = env.sign_raw(payload(), env.TYP_POLICY, kit.alice.key, kit.alice.chain)
    other = env.sign_raw(payload(), env.TYP_POLICY, kit.mallory.key, kit.mallory.chain)
    h_alice = good.split(".")[0]
    _, p, s = other.split(".")
    assert "policy.signature" in codes(verify(kit, f"{h_alice}.{p}.{s}"))


def test_untrusted_owner(kit: Kit) -> None:
    token = env.sign_raw(payload("mallory@example.org"), env.TYP_POLICY, kit.mallory.key, kit.mallory.chain)
    v = verify(kit, token)
    assert codes(v) == {"policy.owner_untrusted"}
    v2 = env.EnvelopeVerifier(None).verify(token, env.TYP_POLICY, FIELDS, T0)
    assert codes(v2) == {"policy.owner_untrusted"}


def test_alg_none_and_unsigned(kit: Kit) -> None:
    head = b64u({"alg": "none", "typ": env.TYP_POLICY})
    body = b64u(payload())
    assert codes(verify(kit, f"{head}.{body}.")) == {"policy.unsigned"}
    assert codes(verify(kit, "")) == {"policy.unsigned"}


@pytest.mark.parametrize("token", ["garbage", "a.b", "a.b.c", "!!.??.##", "e30.e30.e30", "e30=.e30.e30"])
def test_malformed(kit: Kit, token: str) -> None:
    v = verify(kit, token)
    assert not v.valid and v.reasons[0].code.startswith("policy.")
    assert v.reasons[0].code in {"policy.malformed", "policy.unsigned", "policy.owner_untrusted"}


def test_hs256_refused(kit: Kit) -> None:
    head = b64u({"alg": "HS256", "typ": env.TYP_POLICY})
    assert codes(verify(kit, f"{head}.e30.c2ln")) == {"policy.alg"}


def test_grant_cannot_pass_as_policy(kit: Kit) -> None:
    token = env.sign_raw(payload(), env.TYP_GRANT, kit.alice.key, kit.alice.chain)
    assert codes(verify(kit, token, typ=env.TYP_POLICY)) == {"policy.typ"}


def test_unknown_fields_version_and_missing_claims(kit: Kit) -> None:
    token = env.sign_raw(payload(color="red", ver=2), env.TYP_POLICY, kit.alice.key, kit.alice.chain)
    assert codes(verify(kit, token)) == {"policy.unknown_field", "policy.version"}
    p = payload()
    del p["jti"]
    p["jti"] = ""
    token = env.sign_raw(p, env.TYP_POLICY, kit.alice.key, kit.alice.chain)
    assert codes(verify(kit, token)) == {"policy.missing_field"}


def test_issuer_must_be_the_signer(kit: Kit) -> None:
    token = env.sign_raw(payload("bob@example.org"), env.TYP_POLICY, kit.alice.key, kit.alice.chain)
    assert codes(verify(kit, token)) == {"policy.issuer_mismatch"}


def test_time_window(kit: Kit) -> None:
    token = env.sign_raw(payload(), env.TYP_POLICY, kit.alice.key, kit.alice.chain)
    assert codes(verify(kit, token, T0 - dt.timedelta(hours=1))) == {"policy.not_yet_valid"}
    assert codes(verify(kit, token, T0 + dt.timedelta(hours=2))) == {"policy.expired"}


def test_grant_prefix(kit: Kit) -> None:
    token = env.sign_raw(payload(), env.TYP_GRANT, kit.alice.key, kit.alice.chain)
    v = verify(kit, token, T0 + dt.timedelta(hours=2), typ=env.TYP_GRANT)
    assert codes(v) == {"grant.expired"}


def test_owner_chain_checked_once_per_owner_and_time(kit: Kit) -> None:
    verifier = env.EnvelopeVerifier(kit.owners)
    before = len(kit.owners.calls)
    for i in range(5):
        tok = env.sign_raw(payload(jti=f"j{i}"), env.TYP_POLICY, kit.alice.key, kit.alice.chain)
        assert verifier.verify(tok, env.TYP_POLICY, FIELDS, T0).valid
    assert len(kit.owners.calls) - before == 1


def test_decode_unverified_errors() -> None:
    with pytest.raises(InputError):
        env.decode_unverified("not a token")
    with pytest.raises(InputError):
        env.decode_unverified("@@.@@.@@")


def test_header_edge_cases(kit: Kit) -> None:
    good = env.sign_raw(payload(), env.TYP_POLICY, kit.alice.key, kit.alice.chain)
    _h, p, s = good.split(".")
    header, _ = env.decode_unverified(good)
    # crit / b64 / jku would change how the token is processed: refused
    for extra in ({"crit": ["exp"]}, {"b64": False}, {"jku": "https://example.org/keys"}):
        v = verify(kit, f"{b64u({**header, **extra})}.{p}.{s}")
        assert codes(v) == {"policy.malformed"}, extra
    # x5c that is not a certificate, or missing
    assert codes(verify(kit, f"{b64u({**header, 'x5c': ['AAAA']})}.{p}.{s}")) == {"policy.malformed"}
    assert codes(verify(kit, f"{b64u({**header, 'x5c': []})}.{p}.{s}")) == {"policy.owner_untrusted"}
    # an RS256 header on an EC owner's token
    assert codes(verify(kit, f"{b64u({**header, 'alg': 'RS256'})}.{p}.{s}")) == {"policy.signature"}
    # oversized tokens are refused before any parsing
    assert codes(verify(kit, "a" * (env.MAX_TOKEN_BYTES + 1))) == {"policy.malformed"}


def test_sign_refuses_bad_inputs(kit: Kit) -> None:
    with pytest.raises(InputError):
        env.sign_raw(payload(), "escort-other+jwt", kit.alice.key, kit.alice.chain)
    with pytest.raises(InputError):
        env.sign_raw(payload(), env.TYP_POLICY, kit.alice.key, [])
    p = payload()
    del p["exp"]
    with pytest.raises(InputError):
        env.sign_raw(p, env.TYP_POLICY, kit.alice.key, kit.alice.chain)


def test_reasons_are_sentences(kit: Kit) -> None:
    token = env.sign_raw(payload("mallory@example.org"), env.TYP_POLICY, kit.mallory.key, kit.mallory.chain)
    r = verify(kit, token).reasons[0]
    assert r.message[0].isupper() and r.message.endswith(".") and r.fix.endswith(".")


def test_no_single_character_change_survives(kit: Kit) -> None:
    """Any one-character change anywhere in a token makes it invalid (no malleable spellings)."""
    import random

    token = env.sign_raw(payload(), env.TYP_POLICY, kit.alice.key, kit.alice.chain)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    rng = random.Random(3)
    dots = [i for i, c in enumerate(token) if c == "."]
    positions = [i for i in range(len(token)) if i not in dots]  # every position, header included
    for i in positions:
        c = rng.choice([a for a in alphabet if a != token[i]])
        v = verify(kit, token[:i] + c + token[i + 1:])
        assert not v.valid, (i, c)
    assert verify(kit, token).valid


@pytest.mark.parametrize("claim", ["nbf", "exp", "iat"])
def test_absurd_dates_are_reasons(kit: Kit, claim: str) -> None:
    token = env.sign_raw(payload(**{claim: 10**30}), env.TYP_POLICY, kit.alice.key, kit.alice.chain)
    v = verify(kit, token)
    assert "policy.malformed" in codes(v) and not v.valid
    assert v.not_before is None or v.not_after is None or claim == "iat"


@pytest.mark.parametrize("who", ["alice", "bob", "carol"])
def test_header_checks_shared_signatures_checked_per_token(kit: Kit, who: str) -> None:
    # an owner's tokens share one header segment, so joserfc's header and key checks run
    # once per segment (envelope._sig_check); the signature must still be checked for
    # every token: a good token first (the segment's checks cached), then forgeries
    # under the same header segment
    owner = getattr(kit, who)
    first = env.sign_raw(payload(owner.email, jti="a"), env.TYP_POLICY, owner.key, owner.chain)
    second = env.sign_raw(payload(owner.email, jti="b"), env.TYP_POLICY, owner.key, owner.chain)
    h1, p1, s1 = first.split(".")
    h2, p2, s2 = second.split(".")
    assert h1 == h2
    assert verify(kit, first).valid
    assert verify(kit, second).valid
    assert env._SIG_CHECKS.get(h1) is not None  # the shared checks are cached for the segment
    raw = env._b64url(s1)

    def enc(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode().rstrip("=")

    flipped = raw[:-1] + bytes([raw[-1] ^ 1])
    for forged in (f"{h1}.{p2}.{s1}", f"{h1}.{p1}.{s2}", f"{h1}.{p1}.{enc(raw[:-1])}",
                   f"{h1}.{p1}.{enc(flipped)}", f"{h1}.{p1}.{enc(bytes(len(raw)))}"):
        assert codes(verify(kit, forged)) == {"policy.signature"}, forged


def test_signature_verdict_is_joserfcs(kit: Kit) -> None:
    # the per-token check (envelope._signature_ok) agrees with joserfc's own
    # jws.validate_compact on good and forged tokens of every key type
    from joserfc import jws

    tokens = []
    for who in ("alice", "bob", "carol", "mallory"):
        owner = getattr(kit, who)
        tokens.append(env.sign_raw(payload(owner.email), env.TYP_POLICY, owner.key, owner.chain))
    forged = [f"{a.split('.')[0]}.{b.split('.')[1]}.{b.split('.')[2]}" for a in tokens for b in tokens]
    seen = set()
    for token in tokens + forged:
        opened = env.open_token(token, env.TYP_POLICY, FIELDS)
        header, _ = env.decode_unverified(token)
        signer = env._signer(tuple(header["x5c"]))
        assert isinstance(signer, env._Signer)
        if signer.alg != header["alg"]:
            continue  # refused before any signature check
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            registry = env._registry(header["alg"])
            theirs = jws.validate_compact(jws.extract_compact(token.encode(), registry=registry),
                                          signer.jose, registry=registry)
        ours = "policy.signature" not in {r.code for r in opened.reasons}
        assert ours == theirs, token
        seen.add(theirs)
    assert seen == {True, False}


def test_bound_owner_is_memoised_per_chain_and_time_only(kit: Kit) -> None:
    # EnvelopeVerifier._bound keeps bind_issuer's answer per (x5c chain, at): the same
    # token checked later, once the owner's certificate has expired, must lose the
    # issuing CA (nobody) and be refused, and another certificate with the same name
    # and e-mail from an untrusted CA never gets the trusted owner's identity
    verifier = env.EnvelopeVerifier(kit.owners)
    alice = kit.alice
    token = env.sign(payload(alice.email), env.TYP_POLICY, alice.key, alice.chain, fields=FIELDS)
    good = verifier.verify(token, env.TYP_POLICY, FIELDS, T0)
    assert good.valid and good.owner is not None and good.owner.key
    assert verifier.verify(token, env.TYP_POLICY, FIELDS, T0).owner == good.owner  # memo hit
    later = T0 + dt.timedelta(days=800)  # past the owner certificate's notAfter
    expired = verifier.verify(token, env.TYP_POLICY, FIELDS, later)
    assert "policy.owner_untrusted" in codes(expired) and not expired.valid
    assert expired.owner is not None and expired.owner.key == "" and expired.owner.issuer_key == ""
    from console.core import issuance as iss

    twin = iss.issue_owner(iss.Subject(alice.name, organization="Owners"), alice.key, kit.rogue_owners_ca,
                           iss.Validity.days(730, start=T0 - dt.timedelta(days=30)), email=alice.email)
    forged = env.sign_raw(payload(alice.email), env.TYP_POLICY, alice.key, [twin])
    other = verifier.verify(forged, env.TYP_POLICY, FIELDS, T0)
    assert codes(other) == {"policy.owner_untrusted"}
    assert other.owner is not None and other.owner.key == "" and not other.owner.same_owner(good.owner)


def test_token_digest_memo_is_the_sha256_of_the_token() -> None:
    import hashlib

    tokens = [f"a.b{i}.c" for i in range(3)] + [" a.b0.c\n"]
    for _ in range(2):  # computed, then from the memo
        for t in tokens:
            assert env.token_digest(t) == hashlib.sha256(t.strip().encode()).hexdigest()
    assert env.token_digest("a.b1.c") != env.token_digest("a.b2.c")
