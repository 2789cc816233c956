"""The start-up check's bookkeeping after its last verdict (issue 12, the shape of the cold
start): the policy memory, the opened cache and the fleet snapshot are written AFTER the
check has said that every verdict is in (``verdicts_final``), in steps -- and what is saved
then is exactly what was decided, whatever happens meanwhile; a check cut short or
overtaken saves no snapshot."""

from __future__ import annotations

import datetime as dt
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from console.adapters.cache import FleetSnapshot
from console.adapters.state import PolicyMemory
from console.core.envelope import reason
from console.core.errors import EscortError
from console.core.inventory import VMView
from console.core.policy import SeenPolicy
from console.demo_scale import generate_scale
from console.services.fleet import FleetService
from tests.unit.scalekit import private_fleet

Verdicts = dict[str, object]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scale(tmp_path_factory.mktemp("f") / "f", vms=40, hosts=12, owners=3, rules=6)


@pytest.fixture
def fleet(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the fleet, a private cache and a private (empty) policy memory."""
    return private_fleet(source, tmp_path, monkeypatch)


def _verdicts(views: list[VMView]) -> Verdicts:
    return {v.uuid: (v.owner, v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
            for v in views}


def _service(fleet: Path, at: dt.datetime | None = None, *, cache: bool = True) -> FleetService:
    service = FleetService.load(fleet, eager=False, at=at)
    service.use_cache = cache
    return service


def _to_the_end(steps: Iterator[list[VMView]], service: FleetService) -> list[VMView]:
    """Step the check until it says every verdict is in; the views it yielded by then."""
    views: list[VMView] = []
    for step in steps:
        views.extend(step)
        if service.verdicts_final:
            return views
    raise AssertionError("the check ended without saying its verdicts were final")


def _finish(steps: Iterator[list[VMView]]) -> None:
    """Step the check's bookkeeping to its end: it yields no verdict, only empty steps."""
    assert all(step == [] for step in steps)


def _memory_file(service: FleetService) -> Path:
    assert service._memory_path is not None
    return service._memory_path


def _full(service: FleetService, vm: str, at: dt.datetime) -> list[tuple[str, bool, list[str]]]:
    return [(d.host, d.allowed, [r.code for r in d.reasons]) for d in service.targets(vm, at=at)]


def test_every_verdict_is_in_before_the_bookkeeping(fleet: Path) -> None:
    """When the check says its verdicts are final, every VM has its verdict (the views are
    those of a check without any cache) and nothing is written yet: neither the snapshot nor
    the policy memory. Both are written by the steps after it; the next launch reuses the
    snapshot and decides the same."""
    service = _service(fleet)
    steps = service.check_in_steps()
    views = _to_the_end(steps, service)
    snapshot = FleetSnapshot(fleet).path
    assert not snapshot.exists() and not _memory_file(service).exists()
    # a decision meanwhile (the console's placement check) leaves the memory's write to it too
    vm = next(iter(service._vms))
    service.explain(vm, next(iter(service._hosts)))
    assert service._pending and not _memory_file(service).exists()
    assert len(views) == len(service._vms)
    assert service.matrix().targets == {v.uuid: v.allowed_targets for v in views}
    _finish(steps)
    assert _verdicts(views) == _verdicts(_service(fleet, cache=False).vms())
    assert snapshot.is_file() and _memory_file(service).is_file()
    assert service._pending == {} and len(PolicyMemory(_memory_file(service)).seen) > 0
    again = _service(fleet)
    warm = [v for step in again.check_in_steps() for v in step]
    assert again.check_source == "snapshot" and _verdicts(warm) == _verdicts(views)


def test_a_snapshot_saved_after_the_end_is_what_was_decided(fleet: Path) -> None:
    """Between the last verdict and the save the console goes on: here a decision about the
    first VM at a time after every instant that matters (its check, policy result and the
    instants noted are replaced in the service's memos) and a problem appended. The snapshot
    saved afterwards still holds the check as decided: a launch at the same time reuses it
    and answers exactly as a check without any cache."""
    at = dt.datetime.now(dt.UTC)
    service = _service(fleet, at)
    steps = service.check_in_steps()
    views = _to_the_end(steps, service)
    vm = next(iter(service._vms.values()))
    host = next(iter(service._hosts))
    later = max(service._instant_set) + dt.timedelta(days=1)
    before = _full(service, vm.uuid, at)
    assert _full(service, vm.uuid, later) != before  # (the memos now hold another answer)
    service.explain(vm.uuid, host, at=later)
    service.problems.append(service.problems[0] if service.problems else
                            _problem("a problem found after the check"))
    instants = set(service._instant_set)
    _finish(steps)
    assert service._instant_set == instants  # (what the console noted meanwhile stays)
    warm = _service(fleet, at)
    reused = _verdicts([v for step in warm.check_in_steps() for v in step])
    assert warm.check_source == "snapshot"
    plain = _service(fleet, at, cache=False)
    assert reused == _verdicts(views) == _verdicts(plain.vms())
    assert _full(warm, vm.uuid, at) == before == _full(plain, vm.uuid, at)
    assert [str(p) for p in warm.problems] == [str(p) for p in plain.problems]


def _problem(text: str) -> object:
    from console.core.pki import Problem

    return Problem("test", reason("fleet.unusable", text, "none"))


def test_another_consoles_memory_entry_meanwhile_stops_the_save(fleet: Path) -> None:
    """Another console records a newer policy of a VM between the last verdict and the save:
    these verdicts were not decided with that memory, so no snapshot is saved (the next
    launch checks anew and refuses the rollback); both consoles' entries are kept."""
    service = _service(fleet)
    steps = service.check_in_steps()
    _to_the_end(steps, service)
    uuid, entry = next(iter(service._pending.items()))
    other = PolicyMemory(_memory_file(service))
    digest = ("1" if entry.digest[0] == "0" else "0") + entry.digest[1:]  # (another policy: always)
    other.record({uuid: SeenPolicy(entry.owner, entry.owner_label, entry.seq + 5, digest)})
    _finish(steps)
    assert not FleetSnapshot(fleet).path.exists()
    kept = PolicyMemory(_memory_file(service)).seen
    assert kept[uuid].seq == entry.seq + 5 and len(kept) == len(service._policies.seen) > 1
    after = _service(fleet)
    views = {v.uuid: v for step in after.check_in_steps() for v in step}
    assert after.check_source == "computed"
    assert [r.code for r in views[uuid].policy_problems] == ["policy.rollback"]


def _cut_before_the_end(service: FleetService, steps: Iterator[list[VMView]]) -> None:
    for step in steps:
        if step:
            break
    assert not service.verdicts_final


def _cut_at_the_end(service: FleetService, steps: Iterator[list[VMView]]) -> None:
    _to_the_end(steps, service)


def _cut_in_the_bookkeeping(service: FleetService, steps: Iterator[list[VMView]]) -> None:
    _to_the_end(steps, service)
    assert next(steps) == []


def _refresh_then_finish(service: FleetService, steps: Iterator[list[VMView]]) -> None:
    _to_the_end(steps, service)
    host = next(iter(service._hosts))
    service.apply_facts(host, None, reason("host.unreachable", "gone", "none"))
    _finish(steps)


@pytest.mark.parametrize("cut", [_cut_before_the_end, _cut_at_the_end, _cut_in_the_bookkeeping,
                                 _refresh_then_finish])
def test_a_check_cut_short_or_overtaken_saves_no_snapshot(fleet: Path, cut: object) -> None:
    """Closed before its last verdict, at it, or in its bookkeeping; or a refresh after it:
    no snapshot (the next launch checks anew). The collector is on again afterwards, and
    the policies accepted by a check whose verdicts were all in are remembered."""
    assert gc.isenabled()
    service = _service(fleet)
    steps = service.check_in_steps(budget_s=0.0)
    cut(service, steps)  # type: ignore[operator]
    steps.close()  # type: ignore[attr-defined]
    assert gc.isenabled()
    assert not FleetSnapshot(fleet).path.exists()
    remembered = _memory_file(service).exists() and len(PolicyMemory(_memory_file(service)).seen) > 0
    assert remembered == (cut is not _cut_before_the_end)
    after = _service(fleet)
    list(after.check_in_steps())
    assert after.check_source == "computed"


def test_a_failed_check_saves_no_snapshot(fleet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = _service(fleet)
    original = FleetService._host_check
    calls: list[str] = []

    def failing(self: FleetService, name: str, at: dt.datetime) -> object:
        calls.append(name)
        if len(calls) == 3:
            raise EscortError("the disk went away")
        return original(self, name, at)

    monkeypatch.setattr(FleetService, "_host_check", failing)
    with pytest.raises(EscortError):
        list(service.check_in_steps())
    assert gc.isenabled() and not service.verdicts_final
    assert not FleetSnapshot(fleet).path.exists()


def test_the_snapshot_groups_neighbours_in_the_fleets_order(fleet: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With the helper the check decides from both ends of the fleet; the snapshot still
    pickles the checks in groups of neighbours in the fleet's order (a warm start unpickles
    the group of the rows in view): here the decided checks come back to front."""
    from console.services import fleet as svc

    monkeypatch.setattr(svc, "CHECK_GROUP", 4)
    service = _service(fleet)
    list(service.check_in_steps())
    at = service.at
    decided = [(service._vm_check(rec, at), None) for rec in reversed(list(service._vms.values()))]
    inputs = service._vm_inputs()
    first, _ = _run(service._capture(at, (decided, service.matrix(), (), [], {}), inputs, 0.0, 1.0))
    offsets = [first["vms"][uuid][3] for uuid, *_ in inputs]  # type: ignore[index]
    assert offsets == sorted(offsets) and len(set(offsets)) == -(-len(inputs) // 4)


def _run(steps: Iterator[list[VMView]]) -> tuple[dict[str, object], dict[str, object]]:
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
