"""``strictjson.loads`` gives exactly the answers of its earlier, slower form.

The reader builds its two JSON decoders once instead of on every call and skips the
nesting scan when a text has too few brackets to nest too deep. Property: for any
input (random bytes and text, JSON documents, brackets in strings, nesting around the
limit, long digit runs, a byte-order mark, duplicate keys, NaN), it returns the same
value or refuses with the same sentence as ``reference`` below (the reader as it was
before, kept here verbatim).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from console.core import strictjson
from console.core.strictjson import (
    _DIGITS_TO_1,
    _LONG_DIGITS,
    _SURROGATE_ESCAPE,
    MAX_DEPTH,
    StrictJSONError,
    _check_text,
    _constant,
    _float,
    _int,
    _pairs,
    nesting_depth,
)


def reference(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StrictJSONError("not UTF-8 text") from exc
    else:
        text = data
    if nesting_depth(text, max_depth) > max_depth:
        raise StrictJSONError(f"nested deeper than {max_depth} levels")
    digits = text.encode("utf-8", "surrogatepass").translate(_DIGITS_TO_1)
    parse_int = _int if _LONG_DIGITS in digits else None
    try:
        value = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant,
                           parse_int=parse_int, parse_float=_float)
    except StrictJSONError:
        raise
    except (ValueError, RecursionError, TypeError) as exc:
        raise StrictJSONError(f"not JSON ({exc})") from exc
    if not isinstance(data, bytes) or _SURROGATE_ESCAPE.search(text):
        _check_text(value)
    return value


def outcome(fn: Any, data: bytes | str, **kw: Any) -> tuple[str, str]:
    try:
        value = fn(data, **kw)
    except StrictJSONError as exc:
        return "refused", str(exc)
    return "value", repr(value)


_atoms = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6)
_docs = st.recursive(_atoms, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c,
                                                                                  max_size=4),
                     max_leaves=30).map(json.dumps)
_pieces = st.sampled_from(['{', '}', '[', ']', '"', '\\', ',', ':', '"[{"', '"a":1', '1' * 41, '1' * 40,
                           'NaN', '1e999', '-0', '"\\ud800"', '"\\u005b"', '\ufeff', ' ', '{"a":1,"a":2}',
                           'true', 'null', '0.5', '\n', '\t', '\r', '  ', '{}', '[]', '""'])


def _nested(depth: int, in_string: bool) -> str:
    inner = '"' + "[" * 40 + '"' if in_string else "1"
    return "[" * depth + inner + "]" * depth


_texts = st.one_of(
    st.text(max_size=200),
    _docs,
    st.lists(_pieces, max_size=40).map("".join),
    st.builds(_nested, st.integers(0, MAX_DEPTH + 3), st.booleans()),
    _docs.map(lambda t: "\ufeff" + t),
    # one value with whitespace or a second value around it (the scanner's fallback to decode)
    st.builds(lambda a, d, b: a + d + b, st.sampled_from(["", " ", "\n", "\t\r", "x", "1"]), _docs,
              st.sampled_from(["", " ", "\n ", "\r\t", "x", "1", "{}", ","])),
)


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_texts, _texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=120)))
def test_same_answer_as_before(data: bytes | str) -> None:
    assert outcome(strictjson.loads, data) == outcome(reference, data)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.builds(_nested, st.integers(0, 12), st.booleans()), st.integers(1, 10))
def test_same_answer_with_a_smaller_limit(text: str, limit: int) -> None:
    assert outcome(strictjson.loads, text, max_depth=limit) == outcome(reference, text, max_depth=limit)


def test_the_cases_that_matter_still_refuse() -> None:
    for text, why in [("\ufeff{}", "BOM"), ('{"a":1,"a":2}', "duplicate key 'a'"),
                      ("[" * 33 + "]" * 33, "nested"), ("1" * 41, "digits"), ("NaN", "NaN"),
                      ('"\\ud800"', "surrogate")]:
        kind, message = outcome(strictjson.loads, text)
        assert kind == "refused" and why in message, (text, message)
