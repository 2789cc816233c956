"""The start-up helper's hand-over gives the console exactly what opening the tokens itself gives.

The helper opens policies in chunks (``envelope.pack_opened``: marshal, each header and owner
chain once per chunk, and equal trusted_cas lists and require tables of the chunk's payloads
shared so that they are written and loaded once); the console adopts a chunk with
``PolicyBook.adopt_packed``, which also parses each adopted policy's body at once (its
trusted_cas/require once per distinct pair of objects). Here every token of generated
chunks — good policies and policies broken in every field, with values that compare equal
across types (True and 1, 1 and 1.0, -0.0 and 0.0) — is compared between a book that
adopted the chunk and a book that opened and parsed the token itself: the opened token,
the parsed body and the verdict at a time, all compared with their exact types.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from console.core import envelope as env
from console.core import policy as pol
from tests.unit.test_envelope_same import clear_caches, der64, forge, same
from tests.unit.trustkit import T0, Kit, fp, make_kit

AT = T0


def exact(x: Any) -> Any:
    """``x`` with every value's type spelt out (``==`` says True == 1 == 1.0 and -0.0 == 0.0)."""
    if isinstance(x, dict):
        return ("dict", [(exact(k), exact(v)) for k, v in x.items()])
    if isinstance(x, list | tuple):
        return (type(x).__name__, [exact(v) for v in x])
    if isinstance(x, frozenset | set):
        return (type(x).__name__, sorted(repr(exact(v)) for v in x))
    if isinstance(x, float):
        return ("float", x.hex())
    if hasattr(x, "__dataclass_fields__"):
        return (type(x).__name__, [(k, exact(getattr(x, k))) for k in x.__dataclass_fields__])
    return (type(x).__name__, repr(x))


@pytest.fixture(scope="module")
def kit() -> Kit:
    return make_kit()


def _ca(kit: Kit) -> str:
    return fp(kit.root.cert)


UUIDS = ["6f1c2f3e-3b0a-4c55-9b6e-0c3f5a7d9e21", "6F1C2F3E-3B0A-4C55-9B6E-0C3F5A7D9E21", "x", 1, None]
NUMBERS = [0, 1, True, False, 1.0, -0.0, 0.0, -1, 2**53, 2**53 + 1, "1", None]


def shapes(kit: Kit) -> tuple[list[Any], list[Any]]:
    ca = _ca(kit)
    cas: list[Any] = [
        [{"name": "Root", "sha256": ca}],
        [{"name": "Root", "sha256": ca.upper()}],
        [{"sha256": ca}],
        [{"name": "Root", "sha256": ca}, {"name": "Root", "sha256": ca}],
        [{"name": "Root", "sha256": ca, "extra": 1}],
        [{"name": 1, "sha256": ca}],
        [{"name": "Root", "sha256": "00"}],
        [],
        "Root",
        None,
    ]
    require: list[Any] = [
        {},
        {"country": ["DE"]},
        {"country": ["DE"], "policies": ["assurance:high"]},
        {"policies": ["assurance:high"], "country": ["DE"]},  # the same table, another key order
        {"country": []},
        {"country": [True]},
        {"country": [1]},
        {"country": ["DE", ""]},
        {"country": "DE"},
        {"bogus": ["x"]},
        [],
        None,
    ]
    return cas, require


@st.composite
def payloads(draw: st.DrawFn, kit: Kit) -> dict[str, Any]:
    cas, require = shapes(kit)
    p: dict[str, Any] = {"ver": draw(st.sampled_from([1, 1, 1, True, 1.0, 2])),
                         "iss": draw(st.sampled_from([kit.alice.email, kit.alice.email, "someone else", 1])),
                         "jti": draw(st.sampled_from(["j1", "j2", 7])),
                         "nbf": draw(st.sampled_from([int(AT.timestamp()) - 60, int(AT.timestamp()) + 600,
                                                      float(int(AT.timestamp()) - 60), True])),
                         "exp": draw(st.sampled_from([int(AT.timestamp()) + 3600, int(AT.timestamp()) - 1])),
                         "vm_uuid": draw(st.sampled_from(UUIDS)),
                         "trusted_cas": draw(st.sampled_from(cas)),
                         "require": draw(st.sampled_from(require))}
    for key, values in (("vm_name", ["web", "", 1, True, None]),
                        ("labels", [[], ["a"], ["a", "b"], [1], [True], "a", None]),
                        ("seq", NUMBERS), ("handover", ["", "a.b.c", "a.b", 1, None]),
                        ("iat", [int(AT.timestamp()) - 60, 1.5, None]), ("zzz", [None, None, 1])):
        value = draw(st.sampled_from(values))
        if value is not None:
            p[key] = value
    return {k: v for k, v in p.items() if v is not None}


def sign(kit: Kit, payload: dict[str, Any]) -> str:
    header = {"alg": "ES256", "typ": env.TYP_POLICY, "x5c": [der64(kit.alice)]}
    return forge(header, json.dumps(payload).encode(), kit.alice.key, "ES256")


def compare(tokens: list[str], kit: Kit) -> int:
    """Adopt ``tokens`` packed in one book, open them in another: the same everything."""
    real = list(dict.fromkeys(t.strip() for t in tokens))
    packed, portables = env.pack_opened(real, env.TYP_POLICY, pol.POLICY_FIELDS)
    clear_caches()
    pol._SHAPES.clear()
    adopted = pol.PolicyBook(kit.owners)
    by_digest = {env.token_digest(t): t for t in real}
    n = adopted.adopt_packed(packed, by_digest)
    assert n == len(real)
    clear_caches()
    pol._SHAPES.clear()
    plain = pol.PolicyBook(kit.owners)
    for token, portable in zip(real, portables, strict=True):
        digest = env.token_digest(token)
        mine = adopted.envelopes._opened[(digest, env.TYP_POLICY)]
        theirs = plain.envelopes.open(token, env.TYP_POLICY, pol.POLICY_FIELDS)
        same(mine, theirs)
        assert exact(mine.payload) == exact(theirs.payload) == exact(portable[1])
        assert exact(dict(mine.header)) == exact(dict(theirs.header))
        uuid = theirs.payload.get("vm_uuid") if theirs.payload else None
        for vm in {uuid if isinstance(uuid, str) else None, None, "6f1c2f3e-3b0a-4c55-9b6e-0c3f5a7d9e22"}:
            a = adopted.verify(token, AT, vm_uuid=vm)
            b = plain.verify(token, AT, vm_uuid=vm)
            assert exact(a) == exact(b), (a, b)
        assert exact(adopted._bodies.get(digest)) == exact(plain._bodies.get(digest)), token
    return n


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_an_adopted_chunk_is_what_opening_each_token_gives(kit: Kit, data: st.DataObject) -> None:
    chunk = data.draw(st.lists(payloads(kit), min_size=1, max_size=8))
    compare([sign(kit, p) for p in chunk], kit)


def test_values_equal_across_types_are_never_shared(kit: Kit) -> None:
    # one chunk whose payloads differ only in values Python calls equal: each keeps its own
    ca = _ca(kit)
    base = {"ver": 1, "iss": kit.alice.email, "jti": "j", "nbf": int(AT.timestamp()) - 60,
            "exp": int(AT.timestamp()) + 3600, "vm_uuid": UUIDS[0],
            "trusted_cas": [{"name": "Root", "sha256": ca}], "require": {"country": ["DE"]}}
    variants = [{}, {"labels": [1]}, {"labels": [True]}, {"labels": [1.0]}, {"seq": 1}, {"seq": True},
                {"labels": [-0.0]}, {"labels": [0.0]}, {"require": {"country": ["DE"], "policies": [1]}},
                {"require": {"country": ["DE"], "policies": [True]}}, {"vm_name": "1"}, {"labels": ["1"]}]
    tokens = [sign(kit, {**base, **v}) for v in variants]
    assert compare(tokens, kit) == len(tokens)
    # and the shared pack loads to the very values each token carries
    packed, _ = env.pack_opened(tokens, env.TYP_POLICY, pol.POLICY_FIELDS)
    book = pol.PolicyBook(kit.owners)
    book.adopt_packed(packed, {env.token_digest(t): t for t in tokens})
    for token, v in zip(tokens, variants, strict=True):
        got = book.envelopes._opened[(env.token_digest(token), env.TYP_POLICY)].payload
        assert got is not None
        assert exact(got) == exact({**base, **v})


def test_equal_shapes_in_a_chunk_are_loaded_once(kit: Kit) -> None:
    # what the sharing is for: a chunk of policies with the same CAs and requirements loads
    # them as one object each (and parses them once), not one per policy
    ca = _ca(kit)
    tokens = [sign(kit, {"ver": 1, "iss": kit.alice.email, "jti": f"j{i}", "nbf": int(AT.timestamp()) - 60,
                         "exp": int(AT.timestamp()) + 3600, "vm_uuid": UUIDS[0],
                         "trusted_cas": [{"name": "Root", "sha256": ca}], "require": {"country": ["DE"]}})
              for i in range(5)]
    packed, _ = env.pack_opened(tokens, env.TYP_POLICY, pol.POLICY_FIELDS)
    book = pol.PolicyBook(kit.owners)
    assert book.adopt_packed(packed, {env.token_digest(t): t for t in tokens}) == 5
    payloads = [book.envelopes._opened[(env.token_digest(t), env.TYP_POLICY)].payload for t in tokens]
    assert all(p is not None for p in payloads)
    assert len({id(p["trusted_cas"]) for p in payloads if p}) == 1
    assert len({id(p["require"]) for p in payloads if p}) == 1
    bodies = [book._bodies[env.token_digest(t)][0] for t in tokens]
    assert len({id(b.requirements) for b in bodies if b}) == 1


def test_a_book_adopts_only_its_own_tokens(kit: Kit) -> None:
    # digests it does not hold, a token of another header, another document type, junk:
    # nothing adopted and no body parsed for them (the console opens those itself)
    ca = _ca(kit)
    good = [sign(kit, {"ver": 1, "iss": kit.alice.email, "jti": f"j{i}", "nbf": int(AT.timestamp()) - 60,
                       "exp": int(AT.timestamp()) + 3600, "vm_uuid": UUIDS[0],
                       "trusted_cas": [{"name": "Root", "sha256": ca}], "require": {}}) for i in range(3)]
    packed, _ = env.pack_opened(good, env.TYP_POLICY, pol.POLICY_FIELDS)
    digests = [env.token_digest(t) for t in good]
    book = pol.PolicyBook(kit.owners)
    assert book.adopt_packed(packed, {digests[0]: good[0]}) == 1
    assert set(book._bodies) == {digests[0]}
    other = forge({"alg": "ES256", "typ": env.TYP_POLICY, "x5c": [der64(kit.mallory)]},
                  {"ver": 1}, kit.mallory.key, "ES256")
    book = pol.PolicyBook(kit.owners)
    assert book.adopt_packed(packed, {digests[1]: other}) == 0
    grant, _ = env.pack_opened(good, env.TYP_GRANT, pol.POLICY_FIELDS)
    for junk in (grant, b"", packed[:-9], b"\x00junk"):
        assert book.adopt_packed(junk, dict(zip(digests, good, strict=True))) == 0
    assert not book._bodies and not book.envelopes._opened


def test_a_body_is_parsed_only_for_what_the_claims_allow(kit: Kit) -> None:
    # a policy whose common claims are broken has no body (as ``_verify`` decides), even
    # when its own fields would parse
    ca = _ca(kit)
    broken = sign(kit, {"ver": 2, "iss": kit.alice.email, "jti": "j", "nbf": int(AT.timestamp()) - 60,
                        "exp": int(AT.timestamp()) + 3600, "vm_uuid": UUIDS[0],
                        "trusted_cas": [{"name": "Root", "sha256": ca}], "require": {}})
    assert compare([broken], kit) == 1
    packed, _ = env.pack_opened([broken], env.TYP_POLICY, pol.POLICY_FIELDS)
    book = pol.PolicyBook(kit.owners)
    book.adopt_packed(packed, {env.token_digest(broken): broken})
    assert book._bodies[env.token_digest(broken)] == (None, ())
    assert not book.verify(broken, AT).valid


def test_an_adopted_body_is_the_one_at_any_later_time(kit: Kit) -> None:
    # the body does not depend on the time; the verdict does, and is made at each time
    ca = _ca(kit)
    token = sign(kit, {"ver": 1, "iss": kit.alice.email, "jti": "j", "nbf": int(AT.timestamp()) - 60,
                       "exp": int(AT.timestamp()) + 3600, "vm_uuid": UUIDS[0],
                       "trusted_cas": [{"name": "Root", "sha256": ca}], "require": {}})
    packed, _ = env.pack_opened([token], env.TYP_POLICY, pol.POLICY_FIELDS)
    book = pol.PolicyBook(kit.owners)
    book.adopt_packed(packed, {env.token_digest(token): token})
    plain = pol.PolicyBook(kit.owners)
    for at in (AT, AT + dt.timedelta(hours=2), AT - dt.timedelta(hours=1)):
        mine, theirs = book.verify(token, at, vm_uuid=UUIDS[0]), plain.verify(token, at, vm_uuid=UUIDS[0])
        assert exact(mine) == exact(theirs)
