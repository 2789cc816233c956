"""Positional makers for dataclasses built once per VM in the start-up check.

A frozen dataclass's ``__init__`` sets each field with ``object.__setattr__`` (one global
lookup, attribute lookup and call per field): for ``PlacementPolicy``'s eleven fields that
is ~18,000 CPU instructions, a third of parsing a policy. ``maker(cls)`` returns a
function taking every field in declaration order that gives the instance its ``__dict__``
in one step, the same dict ``__init__`` would leave (same keys, same order): the object is
equal, hashes, pickles and prints exactly as one made by ``cls(...)`` (tests/unit/
test_records.py). It is refused for a class whose ``__init__`` does more than store its
fields (``__post_init__``, ``InitVar``, a field not in ``__init__``, ``__slots__``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def maker(cls: type[T]) -> Callable[..., T]:
    """``cls(*values)`` without ``__init__``'s per-field work (see the module's note)."""
    if not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__") or "__slots__" in vars(cls):
        raise TypeError(f"{cls.__name__}: only a plain dataclass can be made without __init__")
    names = [f.name for f in dataclasses.fields(cls)]
    # __init__ takes exactly the fields, in order (no InitVar, no field left out of it)
    if list(inspect.signature(cls.__init__).parameters)[1:] != names:
        raise TypeError(f"{cls.__name__}: __init__ must take exactly the fields")
    if any(not n.isidentifier() or n.startswith("_") for n in names):
        raise TypeError(f"{cls.__name__}: field names must be plain identifiers")
    args = ", ".join(names)
    state = ", ".join(f"{n!r}: {n}" for n in names)
    source = (f"def make_{cls.__name__}({args}):\n"
              f"    obj = _new(_cls)\n"
              f"    _set(obj, '__dict__', {{{state}}})\n"
              f"    return obj\n")
    scope: dict[str, Any] = {"_new": object.__new__, "_set": object.__setattr__, "_cls": cls}
    exec(source, scope)  # (generated from the class's own field names, as dataclasses does)
    made: Callable[..., T] = scope[f"make_{cls.__name__}"]
    return made


__all__ = ["maker"]
