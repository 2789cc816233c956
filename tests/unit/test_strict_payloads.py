"""Strict payloads: duplicate keys, empty requirements, and one language for signer and verifier.

The round-trip properties are the contract of ``envelope.sign``: for *any* payload
(hypothesis draws valid ones and every kind of damage), signing succeeds exactly
when the verifier accepts the same payload signed without checks, and what the
verifier reads back is what was signed.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from console.core import envelope as env
from console.core import grants as gr
from console.core import policy as pol
from console.core.errors import InputError
from tests.unit.trustkit import T0, Kit, fp, make_kit

VM = "6f1c1e1a-8d7b-4c36-9d61-2a3f6a0b9e11"
NBF = int(T0.timestamp()) - 60
EXP = int(T0.timestamp()) + 3600
SSH_FP = "SHA256:" + "A" * 43

KIT = make_kit()


@pytest.fixture(scope="module")
def kit() -> Kit:
    return KIT


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _resign_payload_text(kit: Kit, text: str) -> str:
    """A token whose payload is exactly ``text`` (raw JSON), validly signed by Alice."""
    from joserfc import jws
    from joserfc.jwk import ECKey

    token = env.sign_raw({"ver": 1, "iss": "x", "jti": "j", "nbf": 0, "exp": 1}, env.TYP_POLICY,
                         kit.alice.key, kit.alice.chain)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    return jws.serialize_compact(header, text.encode(), ECKey.import_key(kit.alice.key),
                                 registry=env._registry("ES256"))


def _policy(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"ver": 1, "iss": KIT.alice.email, "jti": "j1", "nbf": NBF, "exp": EXP,
                            "vm_uuid": VM, "vm_name": "web-1",
                            "trusted_cas": [{"name": "EU", "sha256": fp(KIT.eu.cert)}],
                            "require": {"country": ["DE"]}}
    base.update(over)
    return base


# ------------------------------------------------------------------ duplicate keys, empty lists

def test_duplicate_payload_key_refused(kit: Kit) -> None:
    good = json.dumps(_policy(), sort_keys=True)
    # the same policy with "require" twice: the first admits DE, the second anything
    text = good[:-1] + ',"require":{}}'
    r = pol.PolicyBook(kit.owners).verify(_resign_payload_text(kit, text), T0)
    assert r.policy is None
    assert [x.code for x in r.reasons] == ["policy.malformed"]
    assert "duplicate key 'require'" in r.reasons[0].message


def test_duplicate_nested_key_refused(kit: Kit) -> None:
    text = json.dumps(_policy(), sort_keys=True).replace('"country": ["DE"]',
                                                         '"country": ["DE"], "country": ["US"]')
    r = pol.PolicyBook(kit.owners).verify(_resign_payload_text(kit, text), T0)
    assert r.policy is None and "duplicate key 'country'" in r.reasons[0].message


def test_duplicate_header_key_refused(kit: Kit) -> None:
    token = pol.sign_policy(_policy(), kit.alice.key, kit.alice.chain)
    h, p, s = token.split(".")
    header = base64.urlsafe_b64decode(h + "==").decode()
    forged = _b64u(header.replace('"alg":"ES256"', '"alg":"ES256","alg":"none"').encode())
    r = pol.PolicyBook(kit.owners).verify(f"{forged}.{p}.{s}", T0)
    assert [x.code for x in r.reasons] == ["policy.malformed"]


def test_empty_requirement_list_refused_by_verifier(kit: Kit) -> None:
    token = env.sign_raw(_policy(require={"country": []}), env.TYP_POLICY, kit.alice.key, kit.alice.chain)
    r = pol.PolicyBook(kit.owners).verify(token, T0)
    assert r.policy is None
    assert [x.code for x in r.reasons] == ["policy.empty_requirement"]
    assert "admit any country" in r.reasons[0].message


def test_empty_requirement_list_refused_by_signer(kit: Kit) -> None:
    with pytest.raises(InputError, match="admit any country"):
        pol.sign_policy(_policy(require={"country": []}), kit.alice.key, kit.alice.chain)
    with pytest.raises(InputError, match="no values"):
        pol.build_policy_payload(owner=kit.alice.email, vm_uuid=VM, vm_name="",
                                 trusted_cas=[("EU", "a" * 64)], require={"country": []},
                                 not_before=T0, not_after=T0 + dt.timedelta(days=1))


def test_deeply_nested_header_is_malformed_not_a_crash(kit: Kit) -> None:
    """Nesting far past Python's recursion limit, well under the token size limit."""
    nested = _b64u(b'{"alg":"ES256","x":' + b"[" * 20000 + b"]" * 20000 + b"}")
    assert len(nested) < env.MAX_TOKEN_BYTES
    r = pol.PolicyBook(kit.owners).verify(f"{nested}.e30.AAAA", T0)
    assert [x.code for x in r.reasons] == ["policy.malformed"]
    with pytest.raises(InputError):
        env.decode_unverified(f"{nested}.e30.AAAA")


@pytest.mark.parametrize("text", ['{"ver":NaN}', '{"ver":1e999}', '{"ver":"\\ud800"}',
                                  '{"ver":' + "9" * 100 + "}"])
def test_payload_numbers_and_text_strict(kit: Kit, text: str) -> None:
    r = pol.PolicyBook(kit.owners).verify(_resign_payload_text(kit, text), T0)
    assert r.policy is None and [x.code for x in r.reasons] == ["policy.malformed"]


# ------------------------------------------------------------------ signer == verifier

_junk = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.text(max_size=8),
                  st.lists(st.text(max_size=4), max_size=2), st.dictionaries(st.text(max_size=4),
                                                                             st.integers(), max_size=2))
_fps = st.sampled_from([fp(KIT.eu.cert), "SHA256:" + fp(KIT.us.cert).upper(), "zz", ""])
_ca_entry = st.one_of(st.fixed_dictionaries({"name": st.text(max_size=6), "sha256": _fps}),
                      st.fixed_dictionaries({"sha256": _fps}),
                      st.fixed_dictionaries({"name": st.text(max_size=3), "sha256": _fps,
                                             "extra": st.integers()}),
                      _junk)
_req_values = st.one_of(st.lists(st.sampled_from(["DE", "FR", "", "assurance:high"]), max_size=3), _junk)
_require = st.one_of(st.dictionaries(st.sampled_from([*sorted(pol.REQUIRE_KEYS), "planet"]), _req_values,
                                     max_size=3), _junk)


def _maybe(strategy: st.SearchStrategy[Any], valid: Any) -> st.SearchStrategy[Any]:
    """Mostly the valid value (so valid payloads are common), sometimes anything."""
    return st.one_of(st.just(valid), st.just(valid), strategy)


_policy_payloads = st.fixed_dictionaries(
    {
        "ver": _maybe(st.one_of(st.just(2), st.just(True), _junk), 1),
        "iss": _maybe(st.sampled_from(["", "bob@example.org", "Alice"]), KIT.alice.email),
        "jti": _maybe(_junk, "j1"),
        "nbf": _maybe(st.one_of(st.integers(-5, 2**45), _junk), NBF),
        "exp": _maybe(st.one_of(st.integers(-5, 2**45), _junk), EXP),
        "vm_uuid": _maybe(st.one_of(st.just(VM.upper()), st.just("{" + VM + "}"), _junk), VM),
        "trusted_cas": _maybe(st.one_of(st.lists(_ca_entry, max_size=3), _junk),
                              [{"name": "EU", "sha256": fp(KIT.eu.cert)}]),
        "require": _maybe(_require, {"country": ["DE"]}),
    },
    optional={
        "iat": st.one_of(st.integers(0, 2**34), _junk),
        "vm_name": st.one_of(st.text(max_size=6), _junk),
        "labels": st.one_of(st.lists(st.text(max_size=4), max_size=2), _junk),
        "colour": _junk,
    },
)

_grant_payloads = st.fixed_dictionaries(
    {
        "ver": _maybe(_junk, 1),
        "iss": _maybe(st.sampled_from(["", "bob@example.org"]), KIT.alice.email),
        "jti": _maybe(_junk, "g1"),
        "nbf": _maybe(_junk, NBF),
        "exp": _maybe(_junk, EXP),
        "admin": _maybe(st.one_of(
            st.fixed_dictionaries({"id": st.sampled_from(["anne", ""])},
                                  optional={"ssh_key": st.sampled_from([SSH_FP, "md5:xx", ""]),
                                            "cert_sha256": st.sampled_from(["a" * 64, "nope"]),
                                            "role": st.text(max_size=3)}),
            _junk), {"id": "anne", "ssh_key": SSH_FP}),
    },
    optional={
        "vms": st.one_of(st.lists(st.sampled_from([VM, VM.upper(), "nope"]), max_size=2), _junk),
        "label": st.one_of(st.sampled_from(["web", ""]), _junk),
        "emergency_only": st.one_of(st.booleans(), _junk),
    },
)


def _verifier_accepts(token: str, typ: str, fields: frozenset[str], body: Any) -> bool:
    opened = env.open_token(token, typ, fields)
    return opened.payload is not None and not opened.reasons and not body(opened.payload)


def _same_language(payload: dict[str, Any], typ: str, fields: frozenset[str], body: Any,
                   strict_sign: Any) -> None:
    try:
        raw = env.sign_raw(payload, typ, KIT.carol.key, KIT.carol.chain)
    except InputError:
        raw = None  # the envelope itself refuses (a required claim is missing)
    accepted = raw is not None and _verifier_accepts(raw, typ, fields, body)
    try:
        token = strict_sign(payload, KIT.carol.key, KIT.carol.chain)
    except InputError:
        assert not accepted, f"sign refused a payload the verifier accepts: {payload!r}"
        return
    assert accepted, f"sign made a token the verifier refuses: {payload!r}"
    opened = env.open_token(token, typ, fields)
    assert opened.payload == payload


_SETTINGS = settings(max_examples=400, derandomize=True, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(_policy_payloads)
def test_policy_sign_and_verify_accept_the_same_language(payload: dict[str, Any]) -> None:
    if payload.get("iss") == KIT.alice.email:
        payload["iss"] = KIT.carol.email  # the signer below is Carol (Ed25519: fast)
    _same_language(payload, env.TYP_POLICY, pol.POLICY_FIELDS, pol._body_reasons, pol.sign_policy)


@_SETTINGS
@given(_grant_payloads)
def test_grant_sign_and_verify_accept_the_same_language(payload: dict[str, Any]) -> None:
    if payload.get("iss") == KIT.alice.email:
        payload["iss"] = KIT.carol.email
    _same_language(payload, env.TYP_GRANT, gr.GRANT_FIELDS, gr._body_reasons, gr.sign_grant)


def test_the_generators_reach_both_outcomes() -> None:
    """The properties above are not vacuous: valid and invalid payloads are both drawn."""
    seen: set[bool] = set()

    @settings(max_examples=200, derandomize=True, deadline=None)
    @given(_policy_payloads)
    def probe(payload: dict[str, Any]) -> None:
        payload["iss"] = KIT.carol.email if payload.get("iss") == KIT.alice.email else payload.get("iss")
        try:
            pol.sign_policy(payload, KIT.carol.key, KIT.carol.chain)
            seen.add(True)
        except InputError:
            seen.add(False)

    probe()
    assert seen == {True, False}
