"""One strict JSON reader for every untrusted JSON text escort parses.

Signed payloads, JWS headers and audit lines must mean exactly one thing, and no
input of allowed size may crash the parser or make it slow. Python's ``json``
module accepts several things that break that:

* duplicate object keys (last one wins, so a payload can *show* one value and
  *mean* another) — refused;
* ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON; cannot be written back) — refused;
* lone UTF-16 surrogate escapes (``"\\ud800"``: a str that cannot be encoded as
  UTF-8 again) — refused;
* integers of thousands of digits (slow to convert, refused by Python only past
  4300 digits) — refused past ``MAX_INT_DIGITS``;
* deep nesting (``[[[[...``: ``RecursionError`` deep inside the parser) — the
  nesting depth is measured with a linear scan *before* parsing and refused past
  ``MAX_DEPTH``.

``loads`` raises ``StrictJSONError`` (a ValueError) with one plain sentence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

#: Deeper than any document escort reads (policies nest three levels).
MAX_DEPTH = 32
#: 2**63 has 19 digits; timestamps and sequence numbers need far fewer than 40.
MAX_INT_DIGITS = 40

#: A whole JSON string (skipped: brackets inside strings do not nest), an unterminated
#: one running to the end of the text.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
#: ``bytes.translate`` deletes everything but brackets.
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
#: ``bytes.translate``: ASCII digits become "1", every other byte "0" (then a long run of
#: "1" is a long run of digits).
_DIGITS_TO_1 = bytes(0x31 if 0x30 <= c <= 0x39 else 0x30 for c in range(256))
_LONG_DIGITS = b"1" * (MAX_INT_DIGITS + 1)
_NOT_QUOTES_OR_BRACKETS = bytes(c for c in range(256) if c not in b'"[]{}')
#: Where a lone surrogate could come from in text decoded from UTF-8: a \uD800-\uDFFF escape.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class StrictJSONError(ValueError):
    """The text is not strict JSON; the message says why in one sentence."""


def nesting_depth(data: bytes | str, limit: int = MAX_DEPTH) -> int:
    """Greatest nesting depth of ``[``/``{`` outside strings; stops counting past ``limit``.

    Linear in the input and independent of the parser, so it can run before it.
    """
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    # Only brackets outside strings count. Fast path, at C speed: without a backslash
    # quotes alternate open/close, so keeping only quotes and brackets and dropping
    # every adjacent "" leaves no quote at all exactly when no string holds a bracket
    # (each drop then paired a string's own quotes) -- what is left is the answer's
    # input. Anything else takes the regex over strings (~25 MB/s).
    brackets = raw.translate(None, _NOT_QUOTES_OR_BRACKETS).replace(b'""', b"")
    if b"\\" in raw or b'"' in brackets:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        outside = _STRING.sub("", text)
        brackets = outside.encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for ch in brackets:
        if ch in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # only then look for the first repeated key (C speed otherwise)
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise StrictJSONError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON number")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise StrictJSONError(f"an integer of {len(text.lstrip('-'))} digits is too long")
    return int(text)


def _float(text: str) -> float:
    if len(text) > 2 * MAX_INT_DIGITS:
        raise StrictJSONError("a number is too long")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise StrictJSONError(f"{text} is out of range")
    return value


def _check_text(value: Any, depth: int = 0) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise StrictJSONError("a string holds a lone surrogate escape (not Unicode text)") from exc
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, depth + 1)
            _check_text(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_text(v, depth + 1)


#: ``json.loads(text, object_pairs_hook=_pairs, ...)`` builds a decoder (and its C scanner)
#: on every call; these are built once (json's own module-level decoder is shared the
#: same way: a decoder keeps no state between calls). Without / with the per-integer hook.
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)
_DECODER_LONG_INTS = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant,
                                      parse_int=_int, parse_float=_float)
#: their C scanners (``decode`` calls them after skipping whitespace)
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_SCAN_LONG_INTS: Callable[[str, int], tuple[Any, int]] = _DECODER_LONG_INTS.scan_once  # type: ignore[attr-defined]


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse strict JSON or raise ``StrictJSONError`` (one sentence, never another exception)."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StrictJSONError("not UTF-8 text") from exc
    else:
        text = data
    # No text with at most ``max_depth`` opening brackets (strings included) can nest
    # deeper than that: only other texts need the scan (a policy has about ten).
    if text.count("[") + text.count("{") > max_depth and nesting_depth(text, max_depth) > max_depth:
        raise StrictJSONError(f"nested deeper than {max_depth} levels")
    # Without a run of more than MAX_INT_DIGITS digits anywhere (strings included), no
    # integer can be too long: json's own int() then spares a Python call per number.
    # (bytes decoded as UTF-8 are exactly their text encoded again)
    raw = data if isinstance(data, bytes) else text.encode("utf-8", "surrogatepass")
    digits = raw.translate(_DIGITS_TO_1)
    decoder, scan = (_DECODER_LONG_INTS, _SCAN_LONG_INTS) if _LONG_DIGITS in digits else (_DECODER, _SCAN)
    try:
        if text.startswith("\ufeff"):  # what json.loads refuses before decoding
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        # json's C scanner straight away: a text that is one value from its first character
        # to its last is what ``decode`` returns (it scans from the same place). Anything
        # else (whitespace around it, extra data, nothing) goes through ``decode``, which
        # answers or refuses exactly as before; an error the scan raises is the one
        # ``decode``'s own scan from there would raise.
        try:
            value, end = scan(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):
            value = decoder.decode(text)
    except StrictJSONError:
        raise
    except (ValueError, RecursionError, TypeError) as exc:
        raise StrictJSONError(f"not JSON ({exc})") from exc
    # text decoded from UTF-8 holds no surrogate but what an escape makes
    if not isinstance(data, bytes) or _SURROGATE_ESCAPE.search(text):
        _check_text(value)
    return value


__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "StrictJSONError", "loads", "nesting_depth"]
