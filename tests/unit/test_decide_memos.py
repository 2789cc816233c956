"""The console's per-VM decision memos (issue 12, s3): each one answers exactly what the
computation it stands for answers, and never across a different signer, owner chain, time,
document type or policy shape."""

from __future__ import annotations

import datetime as dt
import itertools
import random
from collections.abc import Iterable
from typing import Any

import pytest

from console.core import policy as pol
from console.core.envelope import (
    NBF_SKEW,
    PREFIX,
    TYP_GRANT,
    TYP_POLICY,
    EnvelopeVerifier,
    Opened,
    OwnerIdentity,
    _r,
    _ts,
)
from console.core.pki import ChainResult
from console.core.reasons import Reason

T = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
S = int(T.timestamp())


class _Owners:
    """An owners' trust store whose answer depends on the time and on a switch (as a CRL
    or a new trust directory would change it)."""

    def __init__(self) -> None:
        self.revoked = False
        self.calls = 0

    def verify_owner(self, cert: Any, intermediates: Iterable[Any], at: dt.datetime) -> ChainResult:
        self.calls += 1
        warn = (Reason("owner.warn", f"warning for {cert}", "", "warning"),)
        if self.revoked:
            return ChainResult(False, (Reason("owner.revoked", f"{cert} is revoked", "fix"),), warn)
        if at >= T + dt.timedelta(days=1):
            return ChainResult(False, (Reason("owner.expired", f"{cert} expired", "renew"),), warn)
        return ChainResult(True, (), warn)


_Parts = tuple[tuple[Reason, ...], tuple[Reason, ...], ChainResult | None, OwnerIdentity | None]


def _reference_check(verifier: EnvelopeVerifier, opened: Opened, at: dt.datetime) -> _Parts:
    """``EnvelopeVerifier.check`` as it was before its memo: every part computed for this call."""
    prefix = PREFIX[opened.typ]
    reasons = list(opened.reasons)
    warns: list[Reason] = []
    chain = None
    if opened.certs and opened.owner is not None:
        chain = (verifier.owners.verify_owner(opened.certs[0], opened.certs[1:], at)
                 if verifier.owners is not None else None)
        who = opened.owner.label()
        if chain is None:
            reasons.append(_r(prefix, "owner_untrusted",
                              f"no owners' trust store is configured, so {who} cannot be trusted",
                              "set owners_trust_dir in the fleet file"))
        elif not chain.valid:
            detail = "; ".join(r.message for r in chain.reasons) or "it does not chain to an owners' CA"
            reasons.append(_r(prefix, "owner_untrusted", f"the signer {who} is not a trusted owner: {detail}",
                              "have the owner use a certificate from the owners' CA in owners_trust_dir"))
        if chain is not None:
            warns.extend(chain.warnings)
    payload = opened.payload
    if payload is not None:
        nbf, exp = _ts(payload, "nbf"), _ts(payload, "exp")
        if nbf is not None and at + NBF_SKEW < nbf:
            reasons.append(_r(prefix, "not_yet_valid", f"the {prefix} is valid only from "
                              f"{nbf:%Y-%m-%d %H:%M:%S} UTC",
                              f"wait until then, or ask the owner for a {prefix} valid now"))
        if exp is not None and at >= exp:
            reasons.append(_r(prefix, "expired", f"the {prefix} expired at {exp:%Y-%m-%d %H:%M} UTC",
                              f"ask the owner ({opened.owner.label() if opened.owner else '?'}) "
                              f"to sign a new {prefix}"))
    return tuple(reasons), tuple(warns), chain, opened.owner  # (no CA to bind: chain of one)


ALICE = OwnerIdentity("alice", "alice@example.org", "CN=alice", "a" * 64)
BOB = OwnerIdentity("bob", "bob@example.org", "CN=bob", "b" * 64)
#: windows around T: exact boundaries (nbf - skew, exp), a microsecond either side, values
#: that are not a plain int in range (a bool equals 1, a float, out of range, missing)
WINDOWS: list[tuple[object, object]] = [
    (S - 10, S + 10), (S + 60, S + 100), (S + 61, S + 100), (S - 100, S), (S - 100, S + 1),
    (True, S + 5), (1.0 * S, S + 5), (S - 5, float(S)), (-1, S + 5), (S - 5, 253402300800),
    (S - 5, None), (None, None), (0, 1), (S - 5, True),
]
TIMES = [T, T + dt.timedelta(microseconds=1), T - dt.timedelta(microseconds=1),
         T + dt.timedelta(seconds=1) - dt.timedelta(microseconds=1), T + dt.timedelta(days=2),
         T.astimezone(dt.timezone(dt.timedelta(hours=5)))]


def _opened(n: int, typ: str, owner: OwnerIdentity | None, window: tuple[object, object],
            chain_key: tuple[str, ...] = ("x5c-1",), reasons: tuple[Reason, ...] = ()) -> Opened:
    payload: dict[str, object] = {"iss": "x"}
    for claim, value in zip(("nbf", "exp"), window, strict=True):
        if value is not None:
            payload[claim] = value
    certs = (f"cert-{chain_key[0]}",) if chain_key else ()
    return Opened(f"t{n}", f"d{n}", typ, {}, payload, certs, owner, reasons,  # type: ignore[arg-type]
                  chain_key)


def test_the_envelope_check_is_the_unmemoised_check_for_every_signer_time_and_window() -> None:
    """One verifier asked in a shuffled order (its memo warm, keyed by chain, type and time)
    answers what a check from scratch answers: the other signer sharing an x5c key gets its
    own label, each time its own chain result, each type its own prefix, each token its own
    window (boundaries to the microsecond, a bool or a float never read as a time)."""
    owners = _Owners()
    verifier = EnvelopeVerifier(owners)
    bad = (Reason("policy.malformed", "bad", "fix"),)
    cases = [_opened(n, typ, owner, window, key, why) for n, (typ, owner, window, key, why) in enumerate(
        itertools.product((TYP_POLICY, TYP_GRANT), (ALICE, BOB, None), WINDOWS,
                          (("x5c-1",), ("x5c-2",), ()), ((), bad)))]
    calls = [(o, at) for o in cases for at in TIMES]
    random.Random(12).shuffle(calls)
    for opened, at in calls:
        got = verifier.check_parts(opened, at)
        want = _reference_check(EnvelopeVerifier(owners), opened, at)
        assert got == want, (opened, at)
        checked = verifier.check(opened, at)
        assert (checked.reasons, checked.warnings, checked.owner_chain, checked.owner) == want
        assert checked.payload is opened.payload and checked.digest == opened.digest


def test_a_changed_owner_chain_result_is_never_answered_from_the_memo() -> None:
    """The signer's part is reused only for the very chain result ``owner_chain`` gives now:
    when that is computed anew (its cache dropped, the store's answer changed: a revocation),
    the check says so."""
    owners = _Owners()
    verifier = EnvelopeVerifier(owners)
    opened = _opened(1, TYP_POLICY, ALICE, (S - 10, S + 10))
    assert verifier.check_parts(opened, T)[0] == ()
    owners.revoked = True
    verifier._chains.clear()
    got = verifier.check_parts(opened, T)
    assert [r.code for r in got[0]] == ["policy.owner_untrusted"] and "revoked" in got[0][0].message
    assert got == _reference_check(EnvelopeVerifier(owners), opened, T)
    # the chain checked anew by another document of the same signer first (a grant, a
    # hand-over): that result, not the one the memo was made with
    owners.revoked = False
    verifier._chains.clear()
    assert verifier.owner_chain(opened.certs, T, opened.chain_key) is not None
    assert verifier.check_parts(opened, T) == _reference_check(EnvelopeVerifier(owners), opened, T)
    assert verifier.check_parts(opened, T)[0] == ()


def test_no_owners_store_refuses_every_signer_with_its_own_name() -> None:
    verifier = EnvelopeVerifier(None)
    for owner in (ALICE, BOB, ALICE):
        opened = _opened(1, TYP_POLICY, owner, (S - 10, S + 10))
        got = verifier.check_parts(opened, T)
        assert got == _reference_check(EnvelopeVerifier(None), opened, T)
        assert owner.name in got[0][0].message


def _parse_fresh(raw_cas: Any, req: Any) -> tuple[Any, ...]:
    saved = dict(pol._SHAPES)
    pol._SHAPES.clear()
    try:
        return pol._parse_shape(raw_cas, req)
    finally:
        pol._SHAPES.clear()
        pol._SHAPES.update(saved)


FP = "ab" * 32
SHAPES: list[tuple[Any, Any]] = [
    ([{"name": "A", "sha256": FP}], {"country": ["DE"]}),
    ([{"name": "A", "sha256": FP}], {"country": ["DE", "FR"]}),
    ([{"name": "A", "sha256": FP}], {"locality": ["DE"]}),
    ([{"name": "", "sha256": FP}], {"country": ["DE"]}),
    ([{"name": 0, "sha256": FP}], {"country": ["DE"]}),
    ([{"name": False, "sha256": FP}], {"country": ["DE"]}),
    ([{"name": "A", "sha256": FP}], {"country": [1]}),
    ([{"name": "A", "sha256": FP}], {"country": [True]}),
    ([{"name": "A", "sha256": FP}], {"country": [1.0]}),
    ([{"name": "A", "sha256": FP}], {"country": []}),
    ([{"name": "A", "sha256": FP}], {}),
    ([{"name": "A", "sha256": FP}], []),
    ([{"name": "A", "sha256": FP.upper()}], {}),
    ([{"name": "A", "sha256": FP, "x": 1}], {}),
    ([], {}),
    (None, {}),
    ([{"name": "A", "sha256": FP}], {"policies": ["a", "b"], "org": ["o"]}),
    ([{"name": "A", "sha256": FP}], {"org": ["o"], "policies": ["a", "b"]}),
    ([{"name": "A", "sha256": FP}], {"colour": ["red"]}),
]


def test_a_policy_shape_is_parsed_as_itself_whatever_was_parsed_before() -> None:
    """The shape memo's key (marshal's bytes) tells apart values Python calls equal (a bool
    and 1, 1.0 and 1, "" and 0 as names): every shape, parsed after all the others in any
    order, is what parsing it alone gives; equal shapes share one Requirements object."""
    want = [_parse_fresh(*s) for s in SHAPES]
    keys = [pol._shape_key(*s) for s in SHAPES]
    assert len(set(keys)) == len(keys)
    order = list(range(len(SHAPES))) * 3
    random.Random(3).shuffle(order)
    for i in order:
        raw_cas, req = SHAPES[i]
        assert pol._parse_shape(raw_cas, req) == want[i], SHAPES[i]
    # a copy of a shape (other objects, same JSON) answers from the memo: the same objects
    again = pol._parse_shape([{"name": "A", "sha256": FP}], {"country": ["DE"]})
    assert again is pol._parse_shape([{"name": "A", "sha256": FP}], {"country": ["DE"]})


@pytest.mark.parametrize("seconds", [0, 1, S, S + 1, 253402300799])
def test_a_policy_date_is_the_instant_of_its_seconds(seconds: int) -> None:
    assert pol._utc(seconds) == dt.datetime.fromtimestamp(seconds, dt.UTC)
    assert pol._utc(seconds).tzinfo is dt.UTC and pol._utc(seconds) is pol._utc(seconds)


class _Str(str):
    pass


def _bodies() -> list[dict[str, Any]]:
    """Policy payloads (claims already checked) of every kind ``_parse_body`` may meet."""
    good: dict[str, Any] = {
        "ver": 1, "iss": "owner@example.org", "jti": "j-1", "nbf": S - 10, "exp": S + 10,
        "vm_uuid": "b40ad502-bf90-4371-8ffa-a6b03d4b5bfa", "vm_name": "vm-1",
        "trusted_cas": [{"name": "A", "sha256": FP}], "require": {"country": ["DE"]},
        "labels": ["eu"], "seq": 5}
    variants: list[dict[str, Any]] = [
        {}, {"labels": []}, {"labels": ["a", "b"]}, {"labels": ["a", 1]}, {"labels": "a"},
        {"labels": [_Str("a")]}, {"labels": None}, {"vm_name": _Str("x")}, {"vm_name": 1}, {"vm_name": ""},
        {"vm_uuid": "B40AD502-BF90-4371-8FFA-A6B03D4B5BFA"}, {"vm_uuid": "b40ad502bf9043718ffaa6b03d4b5bfa"},
        {"vm_uuid": "not-a-uuid"}, {"vm_uuid": 7}, {"vm_uuid": _Str("b40ad502-bf90-4371-8ffa-a6b03d4b5bfa")},
        {"seq": 0}, {"seq": True}, {"seq": 1.0}, {"seq": -1}, {"seq": 2**53}, {"seq": 2**53 + 1},
        {"handover": "a.b.c"}, {"handover": ""}, {"handover": "a.b"}, {"handover": 5},
        {"iss": _Str("owner@example.org")}, {"jti": _Str("j")},
        {"require": {"country": []}}, {"require": {"colour": ["red"]}}, {"trusted_cas": []},
        {"trusted_cas": [{"name": "A", "sha256": "nothex"}]}, {"require": []},
    ]
    out = [dict(good)]
    for change in variants:
        body = {**good, **change}
        out.append(body)
    for key in ("labels", "seq", "vm_name", "require", "vm_uuid", "handover"):
        out.append({k: v for k, v in good.items() if k != key})
    return out


def test_a_policy_body_is_parsed_as_every_check_parses_it() -> None:
    """The plain-types path of ``_parse_body`` makes exactly the policy (or the reasons) that
    the path with every check makes, for good bodies and for every odd field."""
    for body in _bodies():
        fast, checked = pol._parse_body(body), pol._parse_body_checked(body)
        assert fast == checked, body
        if fast[0] is not None:
            assert type(fast[0].owner) is str and type(fast[0].jti) is str
            assert vars(fast[0]) == vars(checked[0]) and [type(v) for v in vars(fast[0]).values()] == [
                type(v) for v in vars(checked[0]).values()]
