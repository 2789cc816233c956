"""Owner-signed documents: compact JWS (RFC 7515) carrying the owner's chain in ``x5c``.

Policies and grants share this envelope so that owners can produce and inspect them
with common JOSE tools. Signing is joserfc's; verifying uses joserfc's algorithm and
key checks once per header segment and its signature algorithm per token (for ES256,
the same cryptography call joserfc makes, called directly: ``_Head.verify``), with a
strict base64url of our own. This module decides *which* JWS we accept:

* ``alg`` is one of ES256 (P-256), RS256, EdDSA (Ed25519) — never ``none``, and it
  must fit the key in the leaf certificate;
* ``typ`` names the document (``escort-policy+jwt`` / ``escort-grant+jwt``) so that a
  grant can never be replayed as a policy;
* ``x5c`` holds the owner's certificate first, then intermediates (standard base64
  DER, RFC 7515 §4.1.6); the leaf must chain to the *owners'* trust store;
* the payload is JSON with ``ver`` (1), ``iss``, ``jti``, ``nbf``, ``exp`` (and optional
  ``iat``) plus the document's own fields; anything else is refused.

Verification is split in two so that callers can cache: ``open`` is the
time-independent part (parse, signature, schema), cached by token digest; the
time-dependent part (validity window, owner chain at ``at``) is cheap and cached by
owner chain. Verifying 10,000 policies therefore costs 10,000 signature checks and
one chain check per distinct owner, not one chain check per policy.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import marshal
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from joserfc import jws
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.jws import JWSAlgModel, JWSRegistry

from . import strictjson
from .errors import InputError
from .pki import ChainResult
from .pki.pem import serial_problem
from .reasons import Reason, Severity
from .records import maker

TYP_POLICY = "escort-policy+jwt"
TYP_GRANT = "escort-grant+jwt"
TYP_HANDOVER = "escort-handover+jwt"
PREFIX = {TYP_POLICY: "policy", TYP_GRANT: "grant", TYP_HANDOVER: "handover"}
VERSION = 1
#: Claims every document carries; ``iat`` is optional.
#: Clock-skew allowance for ``nbf``: a document signed on a machine whose clock runs up
#: to this much ahead still counts at once (docs/MIGRATION.md "Time"). ``exp`` gets none.
NBF_SKEW = dt.timedelta(seconds=60)
COMMON_CLAIMS = frozenset({"ver", "iss", "jti", "nbf", "exp", "iat"})
REQUIRED_CLAIMS = ("ver", "iss", "jti", "nbf", "exp")
ALLOWED_HEADER = frozenset({"alg", "typ", "x5c", "kid"})
#: A policy is a few hundred bytes plus a chain; 64 KiB leaves room and bounds parsing.
MAX_TOKEN_BYTES = 64 * 1024
MAX_CHAIN = 8
MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can hold
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ONE_US = dt.timedelta(microseconds=1)
_US_PER_S = 1_000_000
_SKEW_US = NBF_SKEW // _ONE_US

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
JoseKey = ECKey | RSAKey | OKPKey


class OwnerVerifier(Protocol):
    """What envelope verification needs from ``pki.TrustStore`` (tests may fake it)."""

    def verify_owner(
        self, cert: x509.Certificate, intermediates: Iterable[x509.Certificate], at: dt.datetime
    ) -> ChainResult: ...


@dataclass(frozen=True)
class OwnerIdentity:
    """Who signed a document: the leaf certificate in ``x5c`` *and* the CA that certified it.

    An owner is the owners' CA that issued the certificate (identified by its public
    key) plus the certificate's subject and e-mail address, as ``pki.OwnerIdentity``
    says: two owners' CAs can both certify an "alice@example.org", and they are two
    different owners. The
    issuing CA is known only once the chain has been verified (``bind_issuer``);
    until then ``issuer_key`` is "" and the identity matches nobody.
    """

    name: str  # CN, else the RFC 4514 subject
    email: str  # first rfc822Name SAN (or emailAddress), "" if none
    subject: str  # RFC 4514
    fingerprint: str  # SHA-256 of the certificate, lowercase hex
    issuer_key: str = ""  # SHA-256 of the issuing CA's SubjectPublicKeyInfo, lowercase hex
    issuer: str = ""  # the issuing CA's name, for messages

    @property
    def key(self) -> str:
        """The identity owners are compared by (a certificate renewed by the same CA keeps it).

        "" while the issuing CA is unknown: an unverified signer is nobody.
        """
        if not self.issuer_key:
            return ""
        # as pki.OwnerIdentity.key(): the issuing CA's key, the subject and the e-mail
        return f"{self.issuer_key}|{self.subject}|{self.email}"

    def same_owner(self, other: OwnerIdentity | None) -> bool:
        """Whether ``other`` is this owner (same issuing CA key, subject and e-mail); fails closed."""
        return other is not None and bool(self.key) and self.key == other.key

    def label(self) -> str:
        return f"{self.name} <{self.email}>" if self.email and self.email != self.name else self.name

    def matches_iss(self, iss: str) -> bool:
        return iss in {self.name, self.subject} or (bool(self.email) and iss.lower() == self.email.lower())

    def full_label(self) -> str:
        """The label plus the CA that vouches for it (where two owners could share a name)."""
        return f"{self.label()} (certified by {self.issuer})" if self.issuer else self.label()

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "email": self.email, "subject": self.subject,
                "fingerprint": self.fingerprint, "issuer": self.issuer, "issuer_key": self.issuer_key}


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of a certificate's SubjectPublicKeyInfo (its key, whatever the certificate)."""
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def bind_issuer(owner: OwnerIdentity, chain: ChainResult | None) -> OwnerIdentity:
    """``owner`` with the issuing CA of a *verified* chain filled in (unchanged otherwise).

    The issuer is the certificate after the leaf in the verified path (an intermediate
    from x5c or the store); the path builder has checked that it signed the leaf and
    chains to an owners' trust anchor.
    """
    if chain is None or not chain.valid or len(chain.chain) < 2:
        return owner
    ca = chain.chain[1]
    vouched = chain.owner_identity  # the store's own answer (pki), when it gives one
    if vouched is not None:
        return replace(owner, issuer_key=vouched.ca_key, issuer=vouched.ca_name or ca.name)
    try:
        key = spki_sha256(ca.cert)
    except (ValueError, UnsupportedAlgorithm):
        return owner
    return replace(owner, issuer_key=key, issuer=ca.name)

    def matches_iss(self, iss: str) -> bool:
        return iss in {self.name, self.subject} or (bool(self.email) and iss.lower() == self.email.lower())


@dataclass(frozen=True)
class Opened:
    """The time-independent result of checking a token (parse, signature, schema)."""

    token: str
    digest: str
    typ: str
    header: Mapping[str, Any]
    payload: Mapping[str, Any] | None  # None when it could not be trusted at all
    certs: tuple[x509.Certificate, ...] = ()
    owner: OwnerIdentity | None = None
    reasons: tuple[Reason, ...] = ()
    chain_key: tuple[str, ...] = ()  # the x5c entries: identifies the owner chain for caching


#: ``Opened(...)`` with every field, in order (core/records.py): one per token in a cold check
_make_opened = maker(Opened)


@dataclass(frozen=True)
class Verified:
    """A document after every check at one time: payload plus *every* reason."""

    digest: str
    typ: str
    payload: Mapping[str, Any] | None
    owner: OwnerIdentity | None
    reasons: tuple[Reason, ...] = ()
    warnings: tuple[Reason, ...] = ()
    owner_chain: ChainResult | None = None

    @property
    def valid(self) -> bool:
        return self.payload is not None and not self.reasons

    @property
    def not_before(self) -> dt.datetime | None:
        return _ts(self.payload, "nbf")

    @property
    def not_after(self) -> dt.datetime | None:
        return _ts(self.payload, "exp")


def _ts(payload: Mapping[str, Any] | None, claim: str) -> dt.datetime | None:
    value = payload.get(claim) if payload is not None else None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TIMESTAMP:
        return None
    return dt.datetime.fromtimestamp(value, dt.UTC)


#: token -> its digest: every cache asks for a token's digest again (open, is_open,
#: adopt); the dict answers from the string's cached hash instead of hashing ~1.6 KB anew
_DIGESTS: dict[str, str] = {}
_MAX_DIGESTS = 1 << 15


def token_digest(token: str) -> str:
    """SHA-256 of the compact token: the policy/grant identity in caches and the audit log."""
    hit = _DIGESTS.get(token)
    if hit is None:
        hit = hashlib.sha256(token.strip().encode("ascii", "replace")).hexdigest()
        if len(_DIGESTS) >= _MAX_DIGESTS:
            _DIGESTS.clear()
        _DIGESTS[token] = hit
    return hit


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def owner_identity(cert: x509.Certificate) -> OwnerIdentity:
    subject = cert.subject.rfc4514_string()
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(cns[0].value) if cns else subject
    email = ""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        mails = san.get_values_for_type(x509.RFC822Name)
        email = mails[0] if mails else ""
    except x509.ExtensionNotFound:
        pass
    if not email:
        attrs = cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
        email = str(attrs[0].value) if attrs else ""
    return OwnerIdentity(name=name, email=email, subject=subject, fingerprint=fingerprint(cert))


def alg_for_key(key: Any) -> str:
    """The JWS ``alg`` a private or public key signs with."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise InputError(f"EC keys must use P-256 for ES256, not {key.curve.name}")
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise InputError(f"RSA keys need at least 2048 bits, this one has {key.key_size}")
        return "RS256"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise InputError(f"unsupported key type {type(key).__name__}; use EC P-256, RSA or Ed25519")


_REGISTRIES: dict[str, JWSRegistry] = {}


def _registry(alg: str) -> JWSRegistry:
    """joserfc's registry for one algorithm, with room for an ``x5c`` chain in the header.

    joserfc caps protected headers at 512 bytes by default; one certificate is
    already ~700 bytes of base64, so the cap is raised to our own token limit.
    """
    reg = _REGISTRIES.get(alg)
    if reg is None:
        reg = JWSRegistry(algorithms=[alg])
        reg.max_header_length = MAX_TOKEN_BYTES
        _REGISTRIES[alg] = reg
    return reg


def _jose_key(key: Any) -> JoseKey:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return ECKey.import_key(key)
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return RSAKey.import_key(key)
    return OKPKey.import_key(key)


#: A document's own payload check (policy, grant): reasons, [] when the body is good.
BodyCheck = Callable[[Mapping[str, Any]], Sequence[Reason]]


def sign_raw(
    payload: Mapping[str, Any],
    typ: str,
    key: Any,
    chain: Sequence[x509.Certificate],
) -> str:
    """A compact JWS of ``payload`` signed by ``key`` *without* checking the payload.

    Only the envelope itself is checked (document type, key fits the owner
    certificate, the common claims present). Tests use it to make signed tokens the
    verifier must refuse; owners' tools use ``sign``.
    """
    if typ not in PREFIX:
        raise InputError(f"unknown document type {typ!r}")
    if not chain:
        raise InputError("the owner's certificate is required to sign")
    alg = alg_for_key(key)
    leaf_pub = chain[0].public_key()
    pub = key.public_key()
    pub_der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    leaf_der = leaf_pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if pub_der != leaf_der:
        raise InputError("the private key does not belong to the owner certificate")
    missing = [c for c in REQUIRED_CLAIMS if c not in payload]
    if missing:
        raise InputError(f"payload lacks {', '.join(missing)}")
    header = {
        "alg": alg,
        "typ": typ,
        "x5c": [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain],
    }
    try:
        raw = json.dumps(dict(payload), separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InputError(f"the payload is not plain JSON ({exc})") from exc
    with warnings.catch_warnings():
        # joserfc flags EdDSA as superseded by RFC 9864's "Ed25519"; we keep the name
        # most JOSE tools still understand and pin it to Ed25519 keys.
        warnings.simplefilter("ignore", SecurityWarning)
        return jws.serialize_compact(header, raw, _jose_key(key), registry=_registry(alg))
def sign(
    payload: Mapping[str, Any],
    typ: str,
    key: Any,
    chain: Sequence[x509.Certificate],
    *,
    fields: frozenset[str],
    body: BodyCheck | None = None,
) -> str:
    """A compact JWS of ``payload`` signed by ``key``; ``chain`` is owner cert first.

    Signer and verifier accept exactly the same language: the token is opened again
    with the verifier's own time-independent checks (``open_token`` with the
    document's ``fields``, then its ``body`` check) and refused with the first reason
    if anything is wrong, and the payload the verifier reads back must equal the one
    given (nothing changed by JSON encoding). So escort never produces a token it
    would refuse, and refuses to sign nothing the verifier accepts.
    """
    token = sign_raw(payload, typ, key, chain)
    opened = open_token(token, typ, fields)
    problems = list(opened.reasons)
    if opened.payload is not None and not problems and body is not None:
        problems.extend(body(opened.payload))
    if problems:
        raise InputError(f"refusing to sign: {problems[0].message.rstrip('.')}")
    if opened.payload != dict(payload):
        raise InputError("refusing to sign: the payload does not survive JSON encoding unchanged")
    return token


_PLAIN_WORD = re.compile(r"^[a-z]+[,:;]?$")


def sentence(text: str) -> str:
    if not text:
        return text
    # Capitalise only a plain English first word: never a host name (hv-de-1), a file
    # name (fleet.toml:) or anything else that must be shown exactly as written.
    if _PLAIN_WORD.match(text.split(" ", 1)[0]):
        text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def reason(code: str, message: str, fix: str = "", severity: Severity = "error") -> Reason:
    """A Reason in the house style (sentences with a capital and a full stop), as pki writes them."""
    return Reason(code, sentence(message), sentence(fix), severity)


def _r(prefix: str, code: str, message: str, fix: str = "") -> Reason:
    return reason(f"{prefix}.{code}", message, fix)


#: base64url digit -> its value (RFC 4648 §5)
_B64URL_VALUE = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


def _b64url(segment: str) -> bytes:
    """Strict base64url (RFC 7515: no padding, no stray characters, canonical last digit).

    Python's decoder skips characters outside the alphabet and ignores the unused low
    bits of the last digit, so several spellings decode to the same bytes; only the
    canonical one is accepted, so that one document has exactly one token (and one
    digest in the audit log). Checked without encoding the bytes again: the standard
    alphabet's ``+``, ``/`` and any ``=`` are refused here, everything else outside the
    base64url alphabet by binascii's strict mode (after ``-_`` became ``+/``), and a
    last digit of a 2- or 3-digit group must leave its unused low bits zero.
    (tests/unit/test_envelope_fast.py compares it with the re-encoding version.)
    """
    if "+" in segment or "/" in segment or "=" in segment:
        raise ValueError("not base64url")
    rem = len(segment) % 4
    if rem:
        if rem == 1:
            raise ValueError("not base64url (a lone last digit)")
        if _B64URL_VALUE.get(segment[-1], 0) & (0x0F if rem == 2 else 0x03):
            raise ValueError("not canonical base64url")
        return binascii.a2b_base64(segment.encode("ascii").translate(_URLSAFE_TO_STD)
                                   + (b"==" if rem == 2 else b"="), strict_mode=True)
    return binascii.a2b_base64(segment.encode("ascii").translate(_URLSAFE_TO_STD), strict_mode=True)


def _b64url_json(segment: str) -> Any:
    """Strict JSON (``strictjson``: no duplicate keys, bounded nesting) in base64url."""
    return strictjson.loads(_b64url(segment))


_HEADERS: dict[str, dict[str, Any] | None] = {}


def _header(segment: str) -> dict[str, Any] | None:
    """A JWS header segment as a dict (None if unusable), cached: one owner's tokens share it."""
    if segment in _HEADERS:
        hit = _HEADERS[segment]
        return dict(hit) if hit is not None else None
    try:
        value = _b64url_json(segment)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        value = None
    header = value if isinstance(value, dict) else None
    if len(_HEADERS) >= _MAX_SIGNERS:
        _HEADERS.clear()
    _HEADERS[segment] = header
    return dict(header) if header is not None else None


def _check_claims(prefix: str, payload: Mapping[str, Any], fields: frozenset[str]) -> list[Reason]:
    out: list[Reason] = []
    unknown = sorted(set(payload) - COMMON_CLAIMS - fields)
    if unknown:
        out.append(_r(prefix, "unknown_field", f"the {prefix} has unknown field(s) {', '.join(unknown)}",
                      f"re-sign it with a version of escort that knows this {prefix} format"))
    ver = payload.get("ver")
    if ver != VERSION or isinstance(ver, bool):
        out.append(_r(prefix, "version", f"the {prefix} has version {ver!r}; escort understands {VERSION}",
                      f"re-sign the {prefix} as version {VERSION}"))
    for claim in ("iss", "jti"):
        value = payload.get(claim)
        if not isinstance(value, str) or not value:
            out.append(_r(prefix, "missing_field", f"the {prefix} lacks {claim!r} (a non-empty string)",
                          f"re-sign the {prefix} with {claim!r} set"))
    for claim in ("nbf", "exp", "iat"):
        value = payload.get(claim)
        if claim == "iat" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            out.append(_r(prefix, "missing_field", f"the {prefix} lacks {claim!r} (seconds since 1970)",
                          f"re-sign the {prefix} with {claim!r} set"))
        elif not 0 <= value <= MAX_TIMESTAMP:
            out.append(_r(prefix, "malformed",
                          f"the {prefix}'s {claim!r} is not a date between 1970 and 9999",
                          f"re-sign the {prefix} with a sensible validity window"))
    nbf, exp = payload.get("nbf"), payload.get("exp")
    if isinstance(nbf, int) and isinstance(exp, int) and exp <= nbf:
        out.append(_r(prefix, "malformed", f"the {prefix} expires before it starts (exp <= nbf)",
                      f"re-sign the {prefix} with a positive validity window"))
    return out


@dataclass(frozen=True)
class _Signer:
    """What one x5c chain yields, computed once per chain (owners sign many documents)."""

    key: tuple[str, ...]
    certs: tuple[x509.Certificate, ...]
    owner: OwnerIdentity
    alg: str
    jose: JoseKey | None
    problem: str = ""


_SIGNERS: dict[tuple[str, ...], _Signer | str] = {}
_SERIAL_PROBLEM = "serial number "  # how ``serial_problem`` starts
_MAX_SIGNERS = 4096


def _signer(x5c: tuple[str, ...]) -> _Signer | str:
    """Parsed x5c chain (cached), or an error text when it holds no DER certificates."""
    hit = _SIGNERS.get(x5c)
    if hit is not None:
        return hit
    result: _Signer | str
    try:
        certs = tuple(x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c)
        # cryptography parses names, extensions and keys lazily: a damaged certificate
        # fails only when they are first read, so read them all here, once
        for cert in certs:
            _ = (cert.subject, cert.issuer, cert.extensions, cert.serial_number, cert.public_key(),
                 cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_hash_algorithm)
            bad_serial = serial_problem(cert)
            if bad_serial is not None:
                raise ValueError(bad_serial.split(";")[0])  # the fix is the refusal's
        owner = owner_identity(certs[0])
        pub = certs[0].public_key()
    except Exception as exc:
        # untrusted bytes: cryptography raises ValueError, InvalidVersion,
        # DuplicateExtension, UnsupportedAlgorithm...; all of them mean "not usable"
        result = str(exc) or "not DER"
    else:
        try:
            result = _Signer(x5c, certs, owner, alg_for_key(pub), _jose_key(pub))
        except InputError as exc:
            result = _Signer(x5c, certs, owner, "", None, str(exc))
    if len(_SIGNERS) >= _MAX_SIGNERS:
        _SIGNERS.clear()
    _SIGNERS[x5c] = result
    return result


#: header segment -> joserfc's algorithm and the signer's key, both checked (None: refused)
_SIG_CHECKS: dict[str, tuple[JWSAlgModel, JoseKey] | None] = {}


def _sig_check(segment: str, header: Mapping[str, Any], alg: str, signer: _Signer
               ) -> tuple[JWSAlgModel, JoseKey] | None:
    """joserfc's header check (``crit``, registered fields) and key check (type, curve,
    use) for one JWS header segment, computed once per segment.

    They depend on the header and the x5c leaf's key only, and the header segment fixes
    both (x5c is inside it): an owner's tokens share one segment, so 10,000 policies
    from 50 owners run these checks 50 times instead of 10,000 (``jws.validate_compact``
    runs them for every token). The signature itself is checked per token
    (``_signature_ok``).
    """
    if segment in _SIG_CHECKS:
        return _SIG_CHECKS[segment]
    checked: tuple[JWSAlgModel, JoseKey] | None
    registry = _registry(alg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SecurityWarning)  # EdDSA: joserfc's deprecation notice
            registry.check_header(dict(header))
            model = registry.get_alg(alg)
            if signer.jose is None:
                raise JoseError("no usable key")
            model.check_key(signer.jose)
        checked = (model, signer.jose)
    except JoseError:
        checked = None
    if len(_SIG_CHECKS) >= _MAX_SIGNERS:
        _SIG_CHECKS.clear()
    _SIG_CHECKS[segment] = checked
    return checked


@dataclass(frozen=True)
class _Head:
    """What one JWS header segment means for one document type, whatever the payload.

    An owner's tokens all share one header segment (it holds ``x5c``), so 10,000
    policies from 50 owners parse and check 50 headers: the header checks of
    ``open_token`` (in its order), the x5c chain (``_signer``) and joserfc's header and
    key checks (``_sig_check``). ``refusal`` is the first refusal a header alone causes;
    when there is none, ``verify`` checks one token's signature.
    """

    header: dict[str, Any] | None  # None: not base64url JSON
    unsigned: tuple[Reason, ...] = ()  # the refusal of a token with an empty signature
    refusal: tuple[Reason, ...] = ()
    certs: tuple[x509.Certificate, ...] = ()
    owner: OwnerIdentity | None = None
    chain_key: tuple[str, ...] = ()
    alg: str = ""
    checked: tuple[JWSAlgModel, JoseKey] | None = None  # joserfc's checks passed (None: never verifies)
    #: ES256 only: the leaf's public key as joserfc would use it (``get_op_key("verify")``),
    #: the half-length of a signature (r, s) and the ECDSA algorithm joserfc verifies with
    es_key: ec.EllipticCurvePublicKey | None = None
    es_half: int = 0
    es_alg: ec.ECDSA | None = None

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        """The JWS signature over ``signing_input`` (RFC 7515 §5.2) with joserfc's algorithm.

        ES256 is what ``ESAlgorithm.verify`` does, called directly: the signature is r
        and s of the key's size, turned into DER for cryptography's verify; the header
        and key checks it would repeat ran once for the segment (``_sig_check``)."""
        if self.es_key is not None and self.es_alg is not None:
            half = self.es_half
            if len(signature) != 2 * half:
                return False
            der = encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                       int.from_bytes(signature[half:], "big"))
            try:
                self.es_key.verify(der, signing_input, self.es_alg)
            except InvalidSignature:
                return False
            return True
        if self.checked is None:
            return False
        model, key = self.checked
        try:
            if self.alg == "EdDSA":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SecurityWarning)
                    return bool(model.verify(signing_input, signature, key))
            return bool(model.verify(signing_input, signature, key))
        except JoseError:
            return False


#: (header segment, document type) -> what the header means (``_head``)
_HEADS: dict[tuple[str, str], _Head] = {}


def _head(segment: str, typ: str) -> _Head:
    """``_Head`` for one header segment and document type, cached."""
    hit = _HEADS.get((segment, typ))
    if hit is None:
        hit = _make_head(segment, typ)
        if len(_HEADS) >= _MAX_SIGNERS:
            _HEADS.clear()
        _HEADS[(segment, typ)] = hit
    return hit


def _make_head(segment: str, typ: str) -> _Head:
    prefix = PREFIX[typ]
    header = _header(segment)
    if header is None:
        return _Head(None)
    alg = header.get("alg")
    unsigned = (_r(prefix, "unsigned", f"the {prefix} is not signed (alg {alg!r})",
                   f"have the owner sign the {prefix}"),)

    def refuse(code: str, message: str, fix: str) -> _Head:
        return _Head(header, unsigned, (_r(prefix, code, message, fix),))

    if not isinstance(alg, str) or alg.lower() == "none":
        return _Head(header, unsigned, unsigned)
    if alg not in ("ES256", "RS256", "EdDSA"):
        return refuse("alg", f"the {prefix} uses algorithm {alg!r}; escort accepts ES256, RS256, EdDSA",
                      "re-sign with an EC P-256, RSA or Ed25519 owner key")
    if header.get("typ") != typ:
        return refuse("typ", f"the document is of type {header.get('typ')!r}, expected {typ!r}",
                      f"attach a {prefix}, not another kind of signed document")
    extra = sorted(set(header) - ALLOWED_HEADER)
    if extra:
        return refuse("malformed", f"the {prefix}'s JWS header has unsupported field(s) {', '.join(extra)}",
                      f"re-sign the {prefix} without them")
    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
        return refuse("owner_untrusted", f"the {prefix} carries no owner certificate (x5c)",
                      "re-sign it with the owner certificate in x5c")
    if len(x5c) > MAX_CHAIN:
        return refuse("malformed", f"the {prefix}'s x5c has more than {MAX_CHAIN} certificates",
                      "include only the owner certificate and its intermediates")
    signer = _signer(tuple(x5c))
    if isinstance(signer, str):
        if signer.startswith(_SERIAL_PROBLEM):
            return refuse("malformed", f"the {prefix}'s x5c holds a certificate whose {signer}",
                          "re-sign it with an owner certificate chain whose serials are positive")
        return refuse("malformed", f"the {prefix}'s x5c holds something that is not a DER certificate",
                      "re-sign it with the owner certificate chain")
    certs, owner, key = signer.certs, signer.owner, signer.key
    if signer.problem:
        return _Head(header, unsigned, (_r(prefix, "alg", f"the owner's key is unusable: {signer.problem}",
                                           "issue the owner an EC P-256, RSA or Ed25519 certificate"),),
                     certs, owner, key)
    if signer.alg != alg:
        return _Head(header, unsigned, (_r(prefix, "signature",
                                           f"the {prefix} claims {alg} but the owner key needs {signer.alg}",
                                           f"re-sign the {prefix} with the owner's own key"),),
                     certs, owner, key)
    checked = _sig_check(segment, header, alg, signer)
    es_key: ec.EllipticCurvePublicKey | None = None
    es_half = 0
    es_alg: ec.ECDSA | None = None
    if checked is not None and alg == "ES256":
        model, jose = checked
        hash_alg = getattr(model, "hash_alg", None)  # joserfc's ESAlgorithm: SHA-256 for ES256
        if model.name == "ES256" and isinstance(jose, ECKey) and hash_alg is hashes.SHA256:
            try:
                op_key = jose.get_op_key("verify")
            except JoseError:
                checked = None  # joserfc's verify would fail on every token
            else:
                if isinstance(op_key, ec.EllipticCurvePublicKey):
                    es_key, es_alg = op_key, ec.ECDSA(hashes.SHA256())
                    es_half = (jose.curve_key_size + 7) // 8
    return _Head(header, unsigned, (), certs, owner, key, alg, checked, es_key, es_half, es_alg)


def open_token(token: str, typ: str, fields: frozenset[str], digest: str = "") -> Opened:
    """Parse ``token``, check its header, signature and claim schema (no time, no trust).

    ``fields`` are the document's own payload fields beyond the common claims;
    ``digest`` may be passed when the caller has computed it already.
    """
    prefix = PREFIX[typ]
    token = token.strip()
    digest = digest or token_digest(token)

    def bad(code: str, message: str, fix: str, header: Mapping[str, Any] | None = None) -> Opened:
        return Opened(token, digest, typ, header or {}, None, reasons=(_r(prefix, code, message, fix),))

    if not token:
        return bad("unsigned", f"there is no {prefix}", f"attach an owner-signed {prefix}")
    if len(token) > MAX_TOKEN_BYTES:
        return bad("malformed", f"the {prefix} is larger than {MAX_TOKEN_BYTES // 1024} KiB",
                   f"attach the {prefix} token itself, not another file")
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        return bad("malformed", f"the {prefix} is not a compact JWS (three base64url parts)",
                   f"attach the {prefix} exactly as `escort {prefix} sign/issue` wrote it")
    head = _HEADS.get((parts[0], typ)) or _head(parts[0], typ)
    if head.header is None:
        return bad("malformed", f"the {prefix}'s JWS header is not base64url JSON",
                   f"attach the {prefix} exactly as it was signed")
    header = dict(head.header)  # each document its own (shallow) copy, as before
    if not parts[2]:
        return Opened(token, digest, typ, header, None, reasons=head.unsigned)
    if head.refusal:
        return Opened(token, digest, typ, header, None, head.certs, head.owner, head.refusal, head.chain_key)
    certs, owner, chain_key = head.certs, head.owner, head.chain_key
    assert owner is not None
    try:
        raw_payload = _b64url(parts[1])
        raw_signature = _b64url(parts[2])
    except (ValueError, binascii.Error):
        return bad("malformed", f"the {prefix}'s payload or signature is not base64url",
                   f"attach the {prefix} exactly as it was signed", header)
    if not head.verify(token[:len(parts[0]) + 1 + len(parts[1])].encode("ascii"), raw_signature):
        return Opened(token, digest, typ, header, None, certs, owner,
                      (_r(prefix, "signature",
                          f"the {prefix}'s signature does not verify with {owner.label()}'s key "
                          "(tampered with, or signed by someone else)",
                          f"ask the owner to sign the {prefix} again"),), chain_key)
    try:
        payload = strictjson.loads(raw_payload)
    except strictjson.StrictJSONError as exc:
        return Opened(token, digest, typ, header, None, certs, owner,
                      (_r(prefix, "malformed", f"the {prefix}'s payload is not strict JSON ({exc})",
                          f"re-sign the {prefix} with escort"),), chain_key)
    if not isinstance(payload, dict):
        return Opened(token, digest, typ, header, None, certs, owner,
                      (_r(prefix, "malformed", f"the {prefix}'s payload is not a JSON object",
                          f"re-sign the {prefix} with escort"),), chain_key)
    reasons = _check_claims(prefix, payload, fields)
    iss = payload.get("iss")
    if isinstance(iss, str) and iss and not owner.matches_iss(iss):
        reasons.append(_r(prefix, "issuer_mismatch",
                          f"the {prefix} names issuer {iss!r} but is signed by {owner.label()}",
                          f"the owner must sign their own {prefix}s"))
    return _make_opened(token, digest, typ, header, payload, certs, owner, tuple(reasons), chain_key)


#: ``open_token`` without the certificate objects (which cannot be pickled): what a
#: worker process sends back when tokens are opened in parallel (see ``adopt``).
Portable = tuple[str, Mapping[str, Any] | None, tuple[Reason, ...], tuple[str, ...]]


def open_portable(tokens: Sequence[str], typ: str, fields: frozenset[str]) -> list[Portable]:
    out: list[Portable] = []
    for token in tokens:
        o = open_token(token, typ, fields)
        out.append((o.digest, o.payload, o.reasons, o.chain_key))
    return out


#: the tag of ``pack_opened``'s bytes (a chunk of another shape is not adopted)
PACKED = "escort-opened-1"


def pack_opened(tokens: Sequence[str], typ: str, fields: frozenset[str]) -> tuple[bytes, list[Portable]]:
    """Open ``tokens`` and pack the results for another process (``adopt_packed``), plus them
    as ``Portable`` (for the opened cache).

    The pack is ``marshal`` of plain values, ~4x cheaper to write and ~1.5x to read than
    pickling the ``Portable`` tuples, and it names each owner chain (x5c) and JWS header
    segment once per chunk instead of once per token: a row is (digest, payload, reasons
    as (code, message, fix, severity), chain number or -1, header segment number).
    Like ``Portable`` it is trusted as this code's own output (the helper process is a
    fork of the console), and never read from anywhere else.
    """
    out: list[Portable] = []
    chains: dict[tuple[str, ...], int] = {}
    heads: dict[str, int] = {}
    rows = []
    shared: dict[bytes, Any] = {}
    for token in tokens:
        o = open_token(token, typ, fields)
        out.append((o.digest, o.payload, o.reasons, o.chain_key))
        segment = o.token.partition(".")[0]
        head = heads.get(segment)
        if head is None:
            head = heads[segment] = len(heads)
        chain = -1
        if o.chain_key:
            chain = chains.get(o.chain_key, -1)
            if chain < 0:
                chain = chains[o.chain_key] = len(chains)
        rows.append((o.digest, _share(o.payload, shared) if o.payload is not None else None,
                     tuple((r.code, r.message, r.fix, r.severity) for r in o.reasons), chain, head))
    return marshal.dumps((PACKED, typ, list(heads), list(chains), rows)), out


#: the payload fields whose equal values a chunk carries once (``_share``): a fleet's
#: policies repeat a few hundred (trusted_cas, require) shapes
SHARED_FIELDS = ("trusted_cas", "require")


def _share(payload: Mapping[str, Any], shared: dict[bytes, Any]) -> Mapping[str, Any]:
    """``payload``, or an equal copy of it whose ``SHARED_FIELDS`` values are the very objects
    of an earlier payload of the chunk where they are equal, so that ``marshal`` writes and
    the reader loads each once (and the console parses each shape once per chunk:
    ``PolicyBook.adopt_packed``). Equal means equal by value and by type all the way down:
    keyed by ``marshal``'s bytes (format 2, no back-references; equal bytes load as equal
    values of the same types: True is not 1, 1.0 is not 1, -0.0 is not 0.0). Only lists
    and tables are shared; the payload itself is never changed."""
    out: Mapping[str, Any] = payload
    copy: dict[str, Any] | None = None
    for k in SHARED_FIELDS:
        v = payload.get(k)
        if type(v) is list or type(v) is dict:
            try:
                got = shared.setdefault(marshal.dumps(v, 2), v)
            except ValueError:  # (marshal writes any JSON value)
                continue
            if got is not v:
                if copy is None:
                    out = copy = dict(payload)
                copy[k] = got
    return out


@dataclass
class EnvelopeVerifier:
    """Verifies tokens against the owners' trust store, caching what can be cached.

    ``open`` results are cached by token digest (time-independent); owner chain
    results by (certificate fingerprints, at). Create one per operation time or keep
    one around: entries for old times simply stop being asked for.
    """

    owners: OwnerVerifier | None
    _opened: dict[tuple[str, str], Opened] = field(default_factory=dict)
    _chains: dict[tuple[tuple[str, ...], dt.datetime], ChainResult] = field(default_factory=dict)
    #: (chain_key, at) -> the chain result and signer it was bound for, and ``bind_issuer``'s answer
    _owners: dict[tuple[tuple[str, ...], dt.datetime],
                  tuple[ChainResult, OwnerIdentity, OwnerIdentity]] = field(default_factory=dict)
    #: (chain_key, typ, at) -> ``_signed_by``'s answer (the signer's part of ``check``)
    _signed: dict[tuple[tuple[str, ...], str, dt.datetime], tuple[
        OwnerIdentity, tuple[Reason, ...], tuple[Reason, ...], ChainResult | None, OwnerIdentity,
        int | None]] = field(default_factory=dict)

    def open(self, token: str, typ: str, fields: frozenset[str]) -> Opened:
        key = (token_digest(token), typ)
        hit = self._opened.get(key)
        if hit is None:
            hit = self._opened[key] = open_token(token, typ, fields, key[0])
        return hit

    def is_open(self, token: str, typ: str) -> bool:
        return (token_digest(token), typ) in self._opened

    def adopt(self, token: str, typ: str, portable: Portable) -> Opened:
        """Cache a token opened elsewhere (another process); certificates come from x5c again."""
        digest, payload, reasons, chain_key = portable
        token = token.strip()
        header = _header(token.split(".")[0]) or {}
        signer = _signer(chain_key) if chain_key else None
        certs, owner = (signer.certs, signer.owner) if isinstance(signer, _Signer) else ((), None)
        opened = Opened(token, digest, typ, header, payload, certs, owner, reasons, chain_key)
        self._opened[(digest, typ)] = opened
        return opened

    def adopt_packed(self, packed: bytes, typ: str, tokens: Mapping[str, str],
                     adopted: list[Opened] | None = None) -> int:
        """Cache the tokens of a ``pack_opened`` chunk that are ``tokens`` (digest -> token) and
        not open yet, exactly as ``adopt`` would; returns how many (and appends them to
        ``adopted`` when given). A chunk of another shape adopts nothing (those tokens are
        then opened here)."""
        try:
            tag, ptyp, heads, chains, rows = marshal.loads(packed)
            if tag != PACKED or ptyp != typ or not isinstance(rows, list):
                return 0
            headers = [(h + ".", _header(h) or {}) for h in heads]
            signers: list[tuple[tuple[x509.Certificate, ...], OwnerIdentity | None, tuple[str, ...]]] = []
            for c in chains:
                signer = _signer(tuple(c))
                signers.append((signer.certs, signer.owner, signer.key) if isinstance(signer, _Signer)
                               else ((), None, tuple(c)))
        except (ValueError, TypeError, EOFError, IndexError):
            return 0
        opened_ = self._opened
        n = 0
        for row in rows:
            try:
                digest, payload, reasons, chain, head = row
                token = tokens.get(digest)
                if token is None or (digest, typ) in opened_:
                    continue
                token = token.strip()
                prefix, header = headers[head]
                if not token.startswith(prefix):  # not this token's header: opened here instead
                    continue
                certs, owner, chain_key = signers[chain] if chain >= 0 else ((), None, ())
                if payload is not None and (owner is None or type(payload) is not dict):
                    continue  # a payload is only ever opened with its signer: not ours, opened here
                why: tuple[Reason, ...] = ()
                if reasons:
                    if not all(type(r) is tuple and len(r) == 4 and all(type(x) is str for x in r)
                               for r in reasons):
                        continue
                    why = tuple(Reason(*r) for r in reasons)
            except (ValueError, TypeError, IndexError):
                continue
            opened = opened_[(digest, typ)] = _make_opened(token, digest, typ, dict(header), payload, certs,
                                                           owner, why, chain_key)
            if adopted is not None:
                adopted.append(opened)
            n += 1
        return n

    def owner_chain(self, certs: Sequence[x509.Certificate], at: dt.datetime,
                    chain_key: tuple[str, ...] = ()) -> ChainResult | None:
        if self.owners is None:
            return None
        key = (chain_key or tuple(fingerprint(c) for c in certs), at)
        hit = self._chains.get(key)
        if hit is None:
            try:
                hit = self.owners.verify_owner(certs[0], certs[1:], at)
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # never a traceback
                why = Reason("cert.malformed", f"the owner certificate cannot be checked ({exc})",
                             "have the owner sign again with an intact certificate")
                hit = ChainResult(False, (why,))
            if len(self._chains) >= _MAX_SIGNERS:  # one entry per owner and minute: forget old ones
                self._chains.clear()
            self._chains[key] = hit
        return hit

    def _bound(self, opened: Opened, chain: ChainResult | None, at: dt.datetime) -> OwnerIdentity:
        """``bind_issuer`` once per owner chain and time: the signer (``opened.owner``) and its
        chain result are both fixed by the x5c entries (``chain_key``) and ``at``."""
        assert opened.owner is not None
        if not opened.chain_key or chain is None:
            return bind_issuer(opened.owner, chain)
        key = (opened.chain_key, at)
        hit = self._owners.get(key)
        if hit is None or hit[0] is not chain or hit[1] != opened.owner:
            if len(self._owners) >= _MAX_SIGNERS:
                self._owners.clear()
            hit = self._owners[key] = (chain, opened.owner, bind_issuer(opened.owner, chain))
        return hit[2]

    def verify(self, token: str, typ: str, fields: frozenset[str], at: dt.datetime) -> Verified:
        opened = self.open(token, typ, fields)
        return self.check(opened, at)

    def check(self, opened: Opened, at: dt.datetime) -> Verified:
        """The time- and trust-dependent checks on an opened token."""
        reasons, warns, chain, owner = self.check_parts(opened, at)
        return Verified(opened.digest, opened.typ, opened.payload, owner, reasons, warns, chain)

    def check_parts(self, opened: Opened, at: dt.datetime) -> tuple[
            tuple[Reason, ...], tuple[Reason, ...], ChainResult | None, OwnerIdentity | None]:
        """``check``'s answer as (reasons, warnings, owner chain, signer with its CA bound).

        The signer's part (its chain at ``at``, the reason if it is not trusted, the chain's
        warnings, ``bind_issuer``) is the same for every token of one x5c chain, type and
        time: it is computed once per (chain_key, type, at) and reused only for the very same
        chain result and signer object (``_signed``). The validity window is compared per
        token, as whole microseconds (exact, no datetime made unless it fails)."""
        payload = opened.payload
        owner = opened.owner
        if opened.certs and owner is not None:
            key = opened.chain_key
            # (``owner_chain``'s and ``_signed_by``'s own memos, looked up here first)
            chain = self._chains.get((key, at)) if key else None
            signed = self._signed.get((key, opened.typ, at)) if chain is not None else None
            if signed is None or signed[0] is not owner or signed[3] is not chain:
                signed = self._signed_by(opened, owner, at)
            reasons = opened.reasons + signed[1] if signed[1] else opened.reasons
            warns, chain, owner, at_us = signed[2], signed[3], signed[4], signed[5]
        else:
            reasons, warns, chain, at_us = opened.reasons, (), None, None
        if payload is not None:
            nbf, exp = payload.get("nbf"), payload.get("exp")
            # exact ints (the claims check makes them so): compared as whole microseconds;
            # anything else, or a window that fails, as ``_ts`` reads it (with the message)
            if (at_us is None or type(nbf) is not int or type(exp) is not int
                    or (0 <= nbf <= MAX_TIMESTAMP and at_us + _SKEW_US < nbf * _US_PER_S)
                    or (0 <= exp <= MAX_TIMESTAMP and at_us >= exp * _US_PER_S)):
                late, early = self._window(opened, at)
            else:
                late = early = None
            if early:
                reasons = (*reasons, early)
            if late:
                reasons = (*reasons, late)
        return reasons, warns, chain, owner

    @staticmethod
    def _window(opened: Opened, at: dt.datetime) -> tuple[Reason | None, Reason | None]:
        """The token's validity window at ``at``: (expired, not yet valid) reasons or None."""
        prefix = PREFIX[opened.typ]
        nbf, exp = _ts(opened.payload, "nbf"), _ts(opened.payload, "exp")
        early = late = None
        if nbf is not None and at + NBF_SKEW < nbf:
            early = _r(prefix, "not_yet_valid",
                       f"the {prefix} is valid only from {nbf:%Y-%m-%d %H:%M:%S} UTC",
                       f"wait until then, or ask the owner for a {prefix} valid now")
        if exp is not None and at >= exp:
            late = _r(prefix, "expired", f"the {prefix} expired at {exp:%Y-%m-%d %H:%M} UTC",
                      f"ask the owner ({opened.owner.label() if opened.owner else '?'}) "
                      f"to sign a new {prefix}")
        return late, early

    def _signed_by(self, opened: Opened, owner: OwnerIdentity, at: dt.datetime) -> tuple[
            OwnerIdentity, tuple[Reason, ...], tuple[Reason, ...], ChainResult | None, OwnerIdentity,
            int | None]:
        """(signer asked for, owner reasons, warnings, chain, bound signer, ``at`` in microseconds)."""
        chain = self.owner_chain(opened.certs, at, opened.chain_key)
        key = (opened.chain_key, opened.typ, at) if opened.chain_key else None
        hit = self._signed.get(key) if key is not None else None
        if hit is not None and hit[0] is owner and hit[3] is chain:
            return hit
        prefix = PREFIX[opened.typ]
        who = owner.label()
        why: tuple[Reason, ...] = ()
        if chain is None:
            why = (_r(prefix, "owner_untrusted",
                      f"no owners' trust store is configured, so {who} cannot be trusted",
                      "set owners_trust_dir in the fleet file"),)
        elif not chain.valid:
            detail = "; ".join(r.message for r in chain.reasons) or "it does not chain to an owners' CA"
            why = (_r(prefix, "owner_untrusted",
                      f"the signer {who} is not a trusted owner: {detail}",
                      "have the owner use a certificate from the owners' CA "
                      "in owners_trust_dir"),)
        warns = tuple(chain.warnings) if chain is not None else ()
        try:
            at_us: int | None = (at - _EPOCH) // _ONE_US
        except TypeError:  # a naive ``at``: compared as datetimes (which refuses it, as before)
            at_us = None
        got = (owner, why, warns, chain, self._bound(opened, chain, at), at_us)
        if key is not None:
            if len(self._signed) >= _MAX_SIGNERS:  # one entry per owner and time: forget old ones
                self._signed.clear()
            self._signed[key] = got
        return got


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload without any check, for ``show`` commands; InputError if unreadable."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise InputError("not a compact JWS (expected three base64url parts separated by dots)")
    try:
        header, payload = _b64url_json(parts[0]), _b64url_json(parts[1])
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InputError("not a compact JWS (a part is not base64url JSON)") from exc
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise InputError("not a compact JWS (header or payload is not a JSON object)")
    return header, payload


__all__ = [
    "NBF_SKEW",
    "PACKED",
    "TYP_GRANT",
    "TYP_HANDOVER",
    "TYP_POLICY",
    "VERSION",
    "EnvelopeVerifier",
    "Opened",
    "OwnerIdentity",
    "OwnerVerifier",
    "Portable",
    "Verified",
    "alg_for_key",
    "bind_issuer",
    "decode_unverified",
    "fingerprint",
    "open_portable",
    "open_token",
    "owner_identity",
    "pack_opened",
    "reason",
    "sign",
    "sign_raw",
    "spki_sha256",
    "token_digest",
]
