"""``envelope.open_token`` gives exactly the answers of its earlier, slower form.

The opener now checks each JWS header segment once per document type (``_head``: the
header checks in their order, the x5c chain, joserfc's header and key checks), calls
cryptography's ES256 verify directly with the owner's pre-loaded key, and checks
base64url without encoding the bytes again. ``reference`` below is the opener as it
was before, kept here verbatim except that the signature is judged by joserfc's own
``jws.validate_compact`` (no cache at all). Every token of a corpus of good, damaged and
forged tokens (each header, payload and signature check hit at least once) must be
opened to the same result — same reasons (codes and sentences), payload, header, owner,
certificates and chain key — with cold caches, with warm ones, in any order, and as
the other document type. A shortcut that skips a check fails here.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import random
import warnings
from collections.abc import Mapping
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.errors import JoseError

from console.core import envelope as env
from console.core import issuance as iss
from console.core import strictjson
from tests.unit.trustkit import T0, Kit, Owner, make_kit

FIELDS = frozenset({"vm_uuid"})


# ------------------------------------------------------------------ the earlier opener, verbatim
def reference_b64url(segment: str) -> bytes:
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        raise ValueError("not canonical base64url")
    return raw


def reference_header(segment: str) -> dict[str, Any] | None:
    try:
        value = strictjson.loads(reference_b64url(segment))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        value = None
    return value if isinstance(value, dict) else None


def joserfc_verifies(token: str, alg: str, signer: env._Signer) -> bool:
    """joserfc's whole check of a compact JWS (no cache of ours)."""
    registry = jws.JWSRegistry(algorithms=[alg])
    registry.max_header_length = env.MAX_TOKEN_BYTES
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if signer.jose is None:
                return False
            obj = jws.extract_compact(token.encode(), registry=registry)
            return bool(jws.validate_compact(obj, signer.jose, registry=registry))
    except JoseError:
        return False


def reference(token: str, typ: str, fields: frozenset[str]) -> env.Opened:
    _r = env._r
    prefix = env.PREFIX[typ]
    token = token.strip()
    digest = env.token_digest(token)

    def bad(code: str, message: str, fix: str, header: Mapping[str, Any] | None = None) -> env.Opened:
        return env.Opened(token, digest, typ, header or {}, None, reasons=(_r(prefix, code, message, fix),))

    if not token:
        return bad("unsigned", f"there is no {prefix}", f"attach an owner-signed {prefix}")
    if len(token) > env.MAX_TOKEN_BYTES:
        return bad("malformed", f"the {prefix} is larger than {env.MAX_TOKEN_BYTES // 1024} KiB",
                   f"attach the {prefix} token itself, not another file")
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        return bad("malformed", f"the {prefix} is not a compact JWS (three base64url parts)",
                   f"attach the {prefix} exactly as `escort {prefix} sign/issue` wrote it")
    header = reference_header(parts[0])
    if header is None:
        return bad("malformed", f"the {prefix}'s JWS header is not base64url JSON",
                   f"attach the {prefix} exactly as it was signed")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none" or not parts[2]:
        return bad("unsigned", f"the {prefix} is not signed (alg {alg!r})",
                   f"have the owner sign the {prefix}", header)
    if alg not in ("ES256", "RS256", "EdDSA"):
        return bad("alg", f"the {prefix} uses algorithm {alg!r}; escort accepts ES256, RS256, EdDSA",
                   "re-sign with an EC P-256, RSA or Ed25519 owner key", header)
    if header.get("typ") != typ:
        return bad("typ", f"the document is of type {header.get('typ')!r}, expected {typ!r}",
                   f"attach a {prefix}, not another kind of signed document", header)
    extra = sorted(set(header) - env.ALLOWED_HEADER)
    if extra:
        return bad("malformed", f"the {prefix}'s JWS header has unsupported field(s) {', '.join(extra)}",
                   f"re-sign the {prefix} without them", header)
    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
        return bad("owner_untrusted", f"the {prefix} carries no owner certificate (x5c)",
                   "re-sign it with the owner certificate in x5c", header)
    if len(x5c) > env.MAX_CHAIN:
        return bad("malformed", f"the {prefix}'s x5c has more than {env.MAX_CHAIN} certificates",
                   "include only the owner certificate and its intermediates", header)
    signer = env._signer(tuple(x5c))
    if isinstance(signer, str):
        return bad("malformed", f"the {prefix}'s x5c holds something that is not a DER certificate",
                   "re-sign it with the owner certificate chain", header)
    certs, owner = signer.certs, signer.owner
    if signer.problem:
        return env.Opened(token, digest, typ, header, None, certs, owner,
                          (_r(prefix, "alg", f"the owner's key is unusable: {signer.problem}",
                              "issue the owner an EC P-256, RSA or Ed25519 certificate"),), signer.key)
    if signer.alg != alg:
        return env.Opened(token, digest, typ, header, None, certs, owner,
                          (_r(prefix, "signature",
                              f"the {prefix} claims {alg} but the owner key needs {signer.alg}",
                              f"re-sign the {prefix} with the owner's own key"),), signer.key)
    try:
        raw_payload = reference_b64url(parts[1])
        reference_b64url(parts[2])
    except (ValueError, binascii.Error):
        return bad("malformed", f"the {prefix}'s payload or signature is not base64url",
                   f"attach the {prefix} exactly as it was signed", header)
    if not joserfc_verifies(token, alg, signer):
        return env.Opened(token, digest, typ, header, None, certs, owner,
                          (_r(prefix, "signature",
                              f"the {prefix}'s signature does not verify with {owner.label()}'s key "
                              "(tampered with, or signed by someone else)",
                              f"ask the owner to sign the {prefix} again"),), signer.key)
    try:
        payload = strictjson.loads(raw_payload)
    except strictjson.StrictJSONError as exc:
        return env.Opened(token, digest, typ, header, None, certs, owner,
                          (_r(prefix, "malformed", f"the {prefix}'s payload is not strict JSON ({exc})",
                              f"re-sign the {prefix} with escort"),), signer.key)
    if not isinstance(payload, dict):
        return env.Opened(token, digest, typ, header, None, certs, owner,
                          (_r(prefix, "malformed", f"the {prefix}'s payload is not a JSON object",
                              f"re-sign the {prefix} with escort"),), signer.key)
    reasons = env._check_claims(prefix, payload, fields)
    iss_ = payload.get("iss")
    if isinstance(iss_, str) and iss_ and not owner.matches_iss(iss_):
        reasons.append(_r(prefix, "issuer_mismatch",
                          f"the {prefix} names issuer {iss_!r} but is signed by {owner.label()}",
                          f"the owner must sign their own {prefix}s"))
    return env.Opened(token, digest, typ, header, payload, certs, owner, tuple(reasons), signer.key)


# ------------------------------------------------------------------ a corpus of tokens
def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def sign_bytes(key: Any, alg: str, data: bytes) -> bytes:
    """A JWS signature made with cryptography alone (no check of what is signed)."""
    if alg == "ES256":
        size = (key.curve.key_size + 7) // 8
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if alg == "RS256":
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data)


def forge(header: Mapping[str, Any] | bytes, payload: Mapping[str, Any] | bytes, key: Any, alg: str) -> str:
    h = b64u(header if isinstance(header, bytes) else json.dumps(header).encode())
    p = b64u(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    return f"{h}.{p}.{b64u(sign_bytes(key, alg, f'{h}.{p}'.encode()))}"


def der64(owner: Owner) -> str:
    return base64.b64encode(owner.cert.public_bytes(serialization.Encoding.DER)).decode()


def claims(owner: Owner, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"ver": 1, "iss": owner.email, "jti": "j1", "nbf": int(T0.timestamp()) - 60,
                            "exp": int(T0.timestamp()) + 3600, "vm_uuid": "x"}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def last_digit_bumped(segment: str) -> str:
    """The same bytes spelt with non-zero unused bits in the last digit (when there are any)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return segment[:-1] + alphabet[alphabet.index(segment[-1]) + 1]


def corpus(kit: Kit) -> list[str]:
    out: list[str] = ["", "   ", "a.b", "a.b.c.d", "é.a.b", "x" * (env.MAX_TOKEN_BYTES + 1)]
    p384_key = ec.generate_private_key(ec.SECP384R1())
    p384 = Owner("Paula", "paula@example.org", p384_key,
                 iss.issue_owner(iss.Subject("Paula", organization="Owners"), p384_key, kit.owners_ca,
                                 iss.Validity.days(730, start=T0 - dt.timedelta(days=30)),
                                 email="paula@example.org"), [])
    owners = [(kit.alice, "ES256"), (kit.bob, "RS256"), (kit.carol, "EdDSA"), (kit.mallory, "ES256"),
              (p384, "ES256")]
    for owner, alg in owners:
        x5c = [der64(owner)]
        for typ in (env.TYP_POLICY, env.TYP_GRANT):
            good_header = {"alg": alg, "typ": typ, "x5c": x5c}
            good = forge(good_header, claims(owner), owner.key, alg)
            h, p, s = good.split(".")
            sig = base64.urlsafe_b64decode(s + "==")
            other = forge(good_header, claims(owner, jti="j2"), owner.key, alg)
            out += [good, other, f"  {good}\n"]
            # signatures
            half = len(sig) // 2
            ones = bytes([255]) * len(sig)
            out += [f"{h}.{p}.", f"{h}.{p}.{b64u(sig[:-1])}", f"{h}.{p}.{b64u(sig + b'0')}",
                    f"{h}.{p}.{b64u(sig[:-1] + bytes([sig[-1] ^ 1]))}",
                    f"{h}.{p}.{b64u(sig[half:] + sig[:half])}", f"{h}.{p}.{b64u(bytes(len(sig)))}",
                    f"{h}.{p}.{b64u(ones)}", f"{h}.{p}.{other.split('.')[2]}",
                    f"{h}.{other.split('.')[1]}.{s}", f"{h}.{p}.{s}=", f"{h}.{p}.{s[:-1]}",
                    f"{h}.{p}.{s}A", f"{h}.{p}.{s.replace('-', '+').replace('_', '/')}",
                    f"{h}.{p}.{s[:10]} {s[10:]}", f"{h}.{p}.{s[:10]}\n{s[10:]}"]
            if len(s) % 4:
                out.append(f"{h}.{p}.{last_digit_bumped(s)}")
            # payload encodings
            out += [f"{h}.{p}=.{s}", f"{h}.{p}A.{s}", f"{h}.{p[:-1]}.{s}", f"{h}..{s}",
                    f"{h}.{p.replace('-', '+').replace('_', '/')}.{s}"]
            if len(p) % 4:
                out.append(f"{h}.{last_digit_bumped(p)}.{s}")
            # signed payloads with something wrong
            body = json.dumps(claims(owner))
            for raw in (body.replace('"ver": 1', '"ver": 1, "ver": 2').encode(),
                        body.replace('"jti": "j1"', '"jti": NaN').encode(),
                        body.replace('"jti": "j1"', '"jti": "\\ud800"').encode(),
                        body.replace('"jti": "j1"', '"jti": ' + "9" * 45).encode(),
                        b"[" * 40 + b"]" * 40, b"[1, 2]", b"not json", b"\xff\xfe", "\ufeff{}".encode(),
                        b'{"a": 1} {"b": 2}', b""):
                out.append(forge(good_header, raw, owner.key, alg))
            for bad in (claims(owner, ver=2), claims(owner, ver=True), claims(owner, iss="eve@example.org"),
                        claims(owner, iss=None), claims(owner, jti=""), claims(owner, nbf=None),
                        claims(owner, exp=int(T0.timestamp()) - 7200), claims(owner, iat=True),
                        claims(owner, exp=10**30), claims(owner, color="red"), claims(owner, iss=owner.name)):
                out.append(forge(good_header, bad, owner.key, alg))
            # headers
            for header in ({**good_header, "alg": "none"}, {**good_header, "alg": "NONE"},
                           {"typ": typ, "x5c": x5c}, {**good_header, "alg": 256},
                           {**good_header, "alg": "HS256"}, {**good_header, "alg": "ES384"},
                           {**good_header, "alg": "RS256" if alg != "RS256" else "ES256"},
                           {**good_header, "typ": "JWT"}, {"alg": alg, "x5c": x5c},
                           {**good_header, "crit": ["exp"]}, {**good_header, "jku": "https://x"},
                           {**good_header, "kid": "k1"}, {**good_header, "kid": 7},
                           {**good_header, "x5c": []}, {**good_header, "x5c": "abc"},
                           {**good_header, "x5c": [1]}, {**good_header, "x5c": x5c * 9},
                           {**good_header, "x5c": ["not base64!"]}, {**good_header, "x5c": ["AAAA"]},
                           {**good_header, "x5c": [der64(kit.alice if owner is not kit.alice else kit.bob)]},
                           {**good_header, "x5c": [*x5c, der64(kit.mallory)]}):
                out.append(forge(header, claims(owner), owner.key, alg))
            out.append(forge(json.dumps(good_header).replace('"alg"', '"alg": "none", "alg"').encode(),
                             claims(owner), owner.key, alg))
            out.append(forge(b"[1]", claims(owner), owner.key, alg))
            out.append(forge(b"{nope", claims(owner), owner.key, alg))
            out += [f"{h}=.{p}.{s}", f"{h[:-1]}.{p}.{s}", f"{last_digit_bumped(h)}.{p}.{s}"
                    if len(h) % 4 else f"{h}A.{p}.{s}"]
    return out


def clear_caches() -> None:
    for cache in (env._DIGESTS, env._HEADERS, env._SIGNERS, env._SIG_CHECKS, env._HEADS):
        cache.clear()


def same(a: env.Opened, b: env.Opened) -> None:
    assert (a.token, a.digest, a.typ, dict(a.header), a.payload, a.reasons, a.chain_key, a.owner) == \
           (b.token, b.digest, b.typ, dict(b.header), b.payload, b.reasons, b.chain_key, b.owner)
    def prints(o: env.Opened) -> list[bytes]:
        return [c.fingerprint(hashes.SHA256()) for c in o.certs]

    assert prints(a) == prints(b)


@pytest.fixture(scope="module")
def kit() -> Kit:
    return make_kit()


@pytest.fixture(scope="module")
def tokens(kit: Kit) -> list[str]:
    return corpus(kit)


def test_corpus_hits_every_refusal(tokens: list[str]) -> None:
    # the corpus is worth something only if it reaches every outcome of the opener
    seen = {r.code for t in tokens for typ in (env.TYP_POLICY, env.TYP_GRANT)
            for r in reference(t, typ, FIELDS).reasons}
    want = {f"{p}.{c}" for p in ("policy", "grant") for c in
            ("unsigned", "malformed", "alg", "typ", "owner_untrusted", "signature", "version",
             "missing_field", "unknown_field", "issuer_mismatch")}
    assert want <= seen, want - seen
    assert any(not reference(t, env.TYP_POLICY, FIELDS).reasons for t in tokens)


@pytest.mark.parametrize("order", ["forward", "backward", "shuffled"])
def test_same_answers_cold_and_warm_in_any_order(tokens: list[str], order: str) -> None:
    todo = [(t, typ) for t in tokens for typ in (env.TYP_POLICY, env.TYP_GRANT)]
    if order == "backward":
        todo.reverse()
    elif order == "shuffled":
        random.Random(12).shuffle(todo)
    clear_caches()
    for _ in range(2):  # cold, then every header already cached (under either type)
        for token, typ in todo:
            same(env.open_token(token, typ, FIELDS), reference(token, typ, FIELDS))


def test_each_token_alone_with_cold_caches(tokens: list[str]) -> None:
    for token in tokens:
        for typ in (env.TYP_POLICY, env.TYP_GRANT):
            clear_caches()
            same(env.open_token(token, typ, FIELDS), reference(token, typ, FIELDS))


def test_es256_is_checked_by_cryptography_directly(kit: Kit) -> None:
    # the fast path is in use for ES256 (so the comparisons above cover it), and a wrong
    # signature under a header whose checks are cached is still refused
    token = forge({"alg": "ES256", "typ": env.TYP_POLICY, "x5c": [der64(kit.alice)]}, claims(kit.alice),
                  kit.alice.key, "ES256")
    assert not env.open_token(token, env.TYP_POLICY, FIELDS).reasons
    head = env._HEADS[(token.split(".")[0], env.TYP_POLICY)]
    assert head.es_key is not None and head.es_half == 32 and head.checked is not None
    h, p, s = token.split(".")
    assert not head.verify(f"{h}.{p}x".encode(), base64.urlsafe_b64decode(s + "=="))
    assert head.verify(f"{h}.{p}".encode(), base64.urlsafe_b64decode(s + "=="))


def test_a_header_refused_for_one_type_is_judged_again_for_the_other(kit: Kit) -> None:
    clear_caches()
    grant = forge({"alg": "ES256", "typ": env.TYP_GRANT, "x5c": [der64(kit.alice)]}, claims(kit.alice),
                  kit.alice.key, "ES256")
    assert {r.code for r in env.open_token(grant, env.TYP_POLICY, FIELDS).reasons} == {"policy.typ"}
    assert not env.open_token(grant, env.TYP_GRANT, FIELDS).reasons
    assert {r.code for r in env.open_token(grant, env.TYP_POLICY, FIELDS).reasons} == {"policy.typ"}


_B64ISH = st.text(alphabet="ABCDQgwxyz0189-_+/= \n\t.é\x00", max_size=12)


@settings(max_examples=3000, deadline=None)
@given(_B64ISH)
def test_b64url_same_as_reencoding(segment: str) -> None:
    try:
        want: bytes | None = reference_b64url(segment)
    except (ValueError, binascii.Error):
        want = None
    try:
        got: bytes | None = env._b64url(segment)
    except (ValueError, binascii.Error):
        got = None
    assert got == want, segment


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_b64url_accepts_every_canonical_spelling(raw: bytes) -> None:
    assert env._b64url(b64u(raw)) == raw



# ------------------------------------------------------------------ packed chunks between processes
def test_packed_chunk_adopts_what_open_token_gives(tokens: list[str]) -> None:
    # what the helper process sends (pack_opened) and the console adopts (adopt_packed)
    # is, token for token, what open_token gives here: reasons, payload, header, owner...
    for typ in (env.TYP_POLICY, env.TYP_GRANT):
        real = list({env.token_digest(t): t for t in tokens if t.strip()}.values())
        packed, portables = env.pack_opened(real, typ, FIELDS)
        assert [p[0] for p in portables] == [env.token_digest(t) for t in real]
        clear_caches()  # the console's own caches are cold
        verifier = env.EnvelopeVerifier(None)
        by_digest = {env.token_digest(t): t for t in real}
        n = verifier.adopt_packed(packed, typ, by_digest)
        adopted = [verifier._opened.get((env.token_digest(t), typ)) for t in real]
        missing = [t for t, o in zip(real, adopted, strict=True) if o is None]
        # only a token whose header segment is the whole token has no "segment." prefix
        assert all("." not in t.strip() for t in missing), missing
        assert n == len(real) - len(missing)
        for token, opened in zip(real, adopted, strict=True):
            if opened is not None:
                same(opened, env.open_token(token, typ, FIELDS))
                same(opened, reference(token, typ, FIELDS))


def test_packed_chunk_adopts_only_what_fits(kit: Kit) -> None:
    owner = kit.alice
    good = [forge({"alg": "ES256", "typ": env.TYP_POLICY, "x5c": [der64(owner)]}, claims(owner, jti=f"j{i}"),
                  owner.key, "ES256") for i in range(3)]
    packed, _ = env.pack_opened(good, env.TYP_POLICY, FIELDS)
    digests = [env.token_digest(t) for t in good]
    verifier = env.EnvelopeVerifier(None)
    # another document type, something else than a pack, a damaged pack: nothing adopted
    assert verifier.adopt_packed(packed, env.TYP_GRANT, dict(zip(digests, good, strict=True))) == 0
    for junk in (b"", b"\x00garbage", packed[:-7], __import__("marshal").dumps(("other", 1))):
        assert verifier.adopt_packed(junk, env.TYP_POLICY, dict(zip(digests, good, strict=True))) == 0
    assert not verifier._opened
    # a digest this process does not know is skipped; one already open is left as it is
    first = verifier.open(good[0], env.TYP_POLICY, FIELDS)
    assert verifier.adopt_packed(packed, env.TYP_POLICY, {digests[0]: good[0], digests[1]: good[1]}) == 1
    assert verifier._opened[(digests[0], env.TYP_POLICY)] is first
    assert (digests[2], env.TYP_POLICY) not in verifier._opened
    # a token of another header than the one packed for its digest is not adopted
    other = forge({"alg": "ES256", "typ": env.TYP_POLICY, "x5c": [der64(kit.mallory)]}, claims(kit.mallory),
                  kit.mallory.key, "ES256")
    assert env.EnvelopeVerifier(None).adopt_packed(packed, env.TYP_POLICY, {digests[2]: other}) == 0


def test_packed_rows_of_another_shape_are_opened_here(kit: Kit) -> None:
    # a row naming a payload without a signer, or a payload that is not an object, or of
    # another length, is never adopted (the token is then opened by the console itself)
    import marshal

    owner = kit.alice
    token = forge({"alg": "ES256", "typ": env.TYP_POLICY, "x5c": [der64(owner)]}, claims(owner),
                  owner.key, "ES256")
    digest = env.token_digest(token)
    head = token.split(".")[0]
    good_row = (digest, claims(owner), (), 0, 0)
    for row in [(digest, claims(owner), (), -1, 0), (digest, [1], (), 0, 0), (digest, claims(owner), (), 0),
                (digest, claims(owner), ((1, 2),), 0, 0), (digest, claims(owner), (), 5, 0),
                (digest, claims(owner), (), 0, 3)]:
        blob = marshal.dumps((env.PACKED, env.TYP_POLICY, [head], [[der64(owner)]], [row]))
        assert env.EnvelopeVerifier(None).adopt_packed(blob, env.TYP_POLICY, {digest: token}) == 0, row
    blob = marshal.dumps((env.PACKED, env.TYP_POLICY, [head], [[der64(owner)]], [good_row]))
    verifier = env.EnvelopeVerifier(None)
    assert verifier.adopt_packed(blob, env.TYP_POLICY, {digest: token}) == 1
    same(verifier._opened[(digest, env.TYP_POLICY)], env.open_token(token, env.TYP_POLICY, FIELDS))
