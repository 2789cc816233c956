"""core/records.py: an instance made by ``maker(cls)`` is the one ``cls(...)`` makes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import pickle

import pytest

from console.core.decisions import VMCheck
from console.core.envelope import OwnerIdentity
from console.core.inventory import VMView
from console.core.policy import PlacementPolicy, PolicyResult, Requirements, TrustedCA
from console.core.reasons import Reason
from console.core.records import maker

T = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
POLICY = PlacementPolicy("u", "n", "o", (TrustedCA("ca", "f" * 64),), Requirements(country=frozenset({"DE"})),
                         T, T + dt.timedelta(days=1), "j", ("l",), 3, "")
RESULT = PolicyResult("d", POLICY, OwnerIdentity("a", "a@x", "CN=a", "0" * 64, "k", "CA"),
                      (Reason("x.y", "m", "f"),), (Reason("w", "m", "", "warning"),))
CASES: list[tuple[type, tuple[object, ...]]] = [
    (PlacementPolicy, tuple(getattr(POLICY, f.name) for f in dataclasses.fields(PlacementPolicy))),
    (PolicyResult, ("d", POLICY, RESULT.owner, RESULT.reasons, RESULT.warnings)),
    (PolicyResult, ("", None, None, (), ())),
    (VMCheck, ("u", "n", "h", RESULT, frozenset({"1.2.3"}))),
    (VMView, ("u", "n", "h", "running", 1024, 2, "o", "1 CA(s)", (), ("a", "b"), False)),
]


@pytest.mark.parametrize(("cls", "values"), CASES)
def test_made_is_constructed(cls: type, values: tuple[object, ...]) -> None:
    made, built = maker(cls)(*values), cls(*values)
    assert type(made) is cls
    assert made == built and repr(made) == repr(built)
    assert list(vars(made).items()) == list(vars(built).items())
    assert pickle.dumps(made) == pickle.dumps(built)
    assert pickle.loads(pickle.dumps(made)) == built
    if cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        assert hash(made) == hash(built)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(made, dataclasses.fields(cls)[0].name, "other")


def test_classes_whose_init_does_more_are_refused() -> None:
    @dataclasses.dataclass
    class Post:
        x: int

        def __post_init__(self) -> None:
            self.x += 1

    @dataclasses.dataclass
    class Init:
        x: int
        y: dataclasses.InitVar[int] = 0

    @dataclasses.dataclass
    class Hidden:
        x: int
        y: int = dataclasses.field(init=False, default=0)

    @dataclasses.dataclass(slots=True)
    class Slots:
        x: int

    class Plain:
        x: int = 0

    for cls in (Post, Init, Hidden, Slots, Plain):
        with pytest.raises(TypeError):
            maker(cls)


def test_the_memorys_get_is_the_mappings_get() -> None:
    """``SeenMemory.get`` (the start-up check asks it per VM) answers as ``Mapping.get`` over
    the same entries: made once, equal to the entry, the default when absent."""
    from collections.abc import Mapping

    from console.adapters.state import SeenMemory
    from console.core.policy import SeenPolicy

    rows = {"u1": ("k|CN=a|a@x", "a (certified by CA)", 3, "d1"), "u2": ("k|CN=b|", "b", 0, "d2")}
    memory, plain = SeenMemory(dict(rows)), SeenMemory(dict(rows))
    for key in ("u1", "u2", "u3", "U1", ""):
        got = memory.get(key)
        assert got == Mapping.get(plain, key) == (SeenPolicy(*rows[key]) if key in rows else None)
        assert memory.get(key, "none") == Mapping.get(plain, key, "none")
        if key in rows:
            assert memory.get(key) is got is memory[key]
