"""Start-up at scale: rows first with an honest "checking…", verdicts streamed in, and the
streamed verdicts equal to what the fleet service decides in one go (one verdict)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from textual.pilot import Pilot

from console.demo_scale import generate_scale
from console.services.fleet import FleetService
from console.ui.app import EscortApp
from console.ui.config import UIConfig
from console.ui.widgets.vtable import VirtualTable
from tests.ui.conftest import settle


@pytest.fixture(scope="module")
def scale_fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scale(tmp_path_factory.mktemp("scale") / "f", vms=120, hosts=30, owners=4, rules=12)


async def checked(app: EscortApp, pilot: Pilot[None]) -> None:
    """Until the start-up check is done and its last rows reached the table (it starts after
    the first paint and signals the screen after its worker ends: on a loaded machine one
    ``settle`` can come too early). Bounded; the assertions after it decide."""
    for _ in range(500):
        await settle(app)
        await pilot.pause(0.02)
        if app.checking:
            continue
        table = app.screen.query_one("#vms-table", VirtualTable)
        if not any(row.cells[4] == "checking…" for row in table.rows_in_view()):
            return


async def test_rows_first_then_every_verdict_streamed_in(scale_fleet: Path) -> None:
    lazy = FleetService.load(scale_fleet, eager=False)
    app = EscortApp(lazy, config=UIConfig(), live=False)
    assert app.progressive and app.checking
    # before the check: every row is "checking…", never a count, and nothing was decided yet
    # (a whole-fleet check before the first paint is what made start-up grow with the fleet)
    assert {row.cells[4] for row in app.vm_rows()} == {"checking…"}
    assert lazy._matrix is None and not lazy._chains
    async with app.run_test(size=(80, 24)) as pilot:
        await checked(app, pilot)
        assert not app.checking
        table = app.screen.query_one("#vms-table", VirtualTable)
        shown = {row.key: row.cells[4] for row in table.rows_in_view()}
    eager = FleetService.load(scale_fleet)  # the whole fleet checked at once, separately
    expected = {v.uuid: v for v in eager.vms()}
    n = len(eager.hosts())
    assert set(shown) == set(expected)
    for key, cell in shown.items():
        vm = expected[key]
        want = f"{len(vm.allowed_targets)}/{n}" if not vm.policy_problems else "✗ 0"
        assert cell == want, (vm.name, cell, want)
    assert any(len(v.allowed_targets) for v in expected.values())  # not all refusals


async def test_an_unreadable_policy_file_is_a_problem_not_a_crash(scale_fleet: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(scale_fleet.parent, copy)
    victim = sorted((copy / "policies").iterdir())[3]
    victim.unlink()
    app = EscortApp(FleetService.load(copy / "fleet.toml", eager=False), config=UIConfig(), live=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await checked(app, pilot)
        assert not app.checking
        assert any(victim.name in p for p in app.all_problems())
        row = next(r for r in app.vm_rows() if r.cells[0] == victim.stem)
        assert row.cells[4] == "✗ 0"  # refused with its reason, not "checking…", not a count


async def test_a_warm_start_streams_the_snapshots_verdicts(scale_fleet: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The console's warm path (snapshot of the last check, loaded beside the event loop, the
    first rows' verdicts first): the rows say what a check without any cache says."""
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    shown: list[dict[str, str]] = []
    sources = []
    for _ in range(2):  # the first launch writes the snapshot, the second reuses it
        lazy = FleetService.load(scale_fleet, eager=False)
        lazy.use_cache = True
        app = EscortApp(lazy, config=UIConfig(), live=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await checked(app, pilot)
            assert not app.checking
            shown.append({row.key: row.cells[4] for row in app.vm_rows()})
        sources.append(lazy.check_source)
    assert sources == ["computed", "snapshot"]
    eager = FleetService.load(scale_fleet)
    n = len(eager.hosts())
    expected = {v.uuid: f"{len(v.allowed_targets)}/{n}" if not v.policy_problems else "✗ 0"
                for v in eager.vms()}
    assert shown[1] == shown[0] == expected


async def test_the_footer_recomposes_once_for_a_burst_of_binding_changes(
        scale_fleet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of binding changes recomposes the footer once, and only when the keys it
    shows changed (one that would mount the same keys again is skipped: at the console's
    start one fell in the fleet check, on the same core)."""
    from console.ui.screens.base import EscortFooter
    from console.ui.screens.vms import VMsScreen

    app = EscortApp(FleetService.load(scale_fleet, eager=False), config=UIConfig(), live=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await checked(app, pilot)
        calls = []
        original = EscortFooter.recompose

        async def counted(self: EscortFooter) -> None:
            calls.append(self)
            await original(self)

        def shown() -> list[str]:
            return [str(k.render()) for k in app.screen.query("FooterKey")]

        monkeypatch.setattr(EscortFooter, "recompose", counted)
        before = shown()
        assert any("Walk" in k for k in before)
        for _ in range(5):  # the same keys, enabled and shown the same way
            app.screen.refresh_bindings()
        await settle(app)
        await pilot.pause(0.1)
        assert calls == [] and shown() == before

        plain_check = VMsScreen.check_action

        def no_walkthrough(self: VMsScreen, action: str, parameters: tuple[object, ...]) -> bool | None:
            return False if action == "walkthrough" else plain_check(self, action, parameters)

        monkeypatch.setattr(VMsScreen, "check_action", no_walkthrough)
        for _ in range(5):  # now one key is hidden
            app.screen.refresh_bindings()
        await settle(app)
        await pilot.pause(0.1)
        assert len(calls) == 1
        after = shown()
        assert after and not any("Walk" in k for k in after)  # the footer shows what is bound now
        assert len(after) == len(before) - 1


def test_a_vm_rows_short_path_builds_the_same_row(scale_fleet: Path) -> None:
    """The rows streamed in during the start-up check (no policy problem, nothing misplaced)
    take a shorter path: the same cells, tones and filter text as the general one."""
    import dataclasses

    app = EscortApp(FleetService.load(scale_fleet), config=UIConfig(), live=False)
    n = len(app.all_hosts())
    views = [v for v in app.all_vms() if not v.policy_problems]
    assert views and any(v.allowed_targets for v in views)
    views += [dataclasses.replace(views[0], allowed_targets=()),  # no target: its count in "bad"
              dataclasses.replace(views[0], host="", policy_summary="")]  # "?" and "—"
    app.misplaced = {}
    short = [app._vm_row(v, n) for v in views]
    app.misplaced = {"no such VM": object()}  # (any entry: the general path for every row)
    general = [app._vm_row(v, n) for v in views]
    assert [(r.key, r.cells, r.tones, r.search) for r in short] == \
        [(r.key, r.cells, r.tones, r.search) for r in general]
    assert short[-2].tones[4] == "bad" and short[-1].cells[2:4] == ("?", "—")


# ------------------------------------------------------------ the title bar's progress
PROGRESS = re.compile(r"checking ([\d,]+) of ([\d,]+) VMs")


def decided_rows(app: EscortApp) -> int:
    return sum(row.cells[4] != "checking…" for row in app.vm_rows())


def drawn_rows(app: EscortApp) -> int | None:
    """Rows with a verdict in the VMs table itself (what it draws), None before it has rows."""
    from console.ui.screens.vms import VMsScreen

    for screen in app.screen_stack:
        if isinstance(screen, VMsScreen):
            tables = list(screen.query("#vms-table").results(VirtualTable))
            if tables and tables[0].row_count:
                return sum(row.cells[4] != "checking…" for row in tables[0]._rows)
    return None


def record_titles(app: EscortApp, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every title line the console computes (any screen, any path: start-up, retitle, a
    refresh), with how many rows had their verdict at that moment: in the app's rows, and in
    the VMs table's own rows (what it draws) -- the title must not run ahead of either."""
    seen: list[tuple[str, int]] = []
    original = EscortApp.title_line

    def spy(self: EscortApp, screen: str) -> str:
        line = original(self, screen)
        if self is app:
            drawn = drawn_rows(self)
            decided = decided_rows(self)
            seen.append((line, decided if drawn is None else min(decided, drawn)))
        return line

    monkeypatch.setattr(EscortApp, "title_line", spy)
    return seen


def in_slices(service: FleetService, size: int) -> None:
    """The service's verdicts handed over ``size`` at a time (same views, same order): the
    console then publishes a first part of the fleet and the rest later, as at 10,000 VMs."""
    steps = service.check_in_steps

    def sliced(**kw: object):  # type: ignore[no-untyped-def]
        for views in steps(**kw):  # type: ignore[arg-type]
            if not views:
                yield views
            for i in range(0, len(views), size):
                yield views[i:i + size]

    service.check_in_steps = sliced  # type: ignore[method-assign]


def assert_honest(seen: list[tuple[str, int]], total: int) -> None:
    """While the title says "checking N of M VMs", N is exactly the rows with a verdict and M
    the fleet; it says nothing of the kind only once every row has its verdict."""
    counts = []
    for line, decided in seen:
        m = PROGRESS.search(line)
        if m:
            n, of = int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))
            assert of == total, line
            assert n <= decided and n < total, (line, decided)
            counts.append(n)
        else:
            assert "checking" not in line and "FAILED" not in line, line
            assert decided == total, (line, decided)  # never "done" before the last verdict
    assert counts and counts[0] == 0, seen  # from the first paint: nothing decided yet
    assert any(0 < n < total for n in counts), counts  # a part of the fleet, counted
    assert not PROGRESS.search(seen[-1][0]), seen[-1]  # and gone when the check is done


async def test_the_title_counts_the_start_up_check_and_clears_when_every_verdict_is_in(
        scale_fleet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lazy = FleetService.load(scale_fleet, eager=False)
    in_slices(lazy, 7)
    app = EscortApp(lazy, config=UIConfig(), live=False)
    total = len(app.vm_rows())
    seen = record_titles(app, monkeypatch)
    assert app.title_line("VMs").startswith(f"escort │ VMs │ checking 0 of {total:,} VMs │ offline")
    async with app.run_test(size=(80, 24)) as pilot:
        await checked(app, pilot)
        assert not app.checking and app.check_decided == total == decided_rows(app)
        bar = str(app.screen.query_one(".title-bar").render())
    assert_honest(seen, total)
    assert "checking" not in bar and bar.startswith("escort │ VMs │ offline │ ")


async def test_the_progress_reads_the_same_on_a_warm_start(scale_fleet: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    sources = []
    for _ in range(2):  # the first launch writes the snapshot, the second reuses it
        lazy = FleetService.load(scale_fleet, eager=False)
        lazy.use_cache = True
        in_slices(lazy, 7)
        app = EscortApp(lazy, config=UIConfig(), live=False)
        with monkeypatch.context() as m:
            seen = record_titles(app, m)
            async with app.run_test(size=(80, 24)) as pilot:
                await checked(app, pilot)
        assert_honest(seen, len(app.vm_rows()))
        sources.append(lazy.check_source)
    assert sources == ["computed", "snapshot"]


async def test_the_progress_starts_again_after_a_refresh(demo_fleet: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A refresh (libvirt's test:// driver answers) re-decides every VM: the count starts
    from 0 again and clears when the new check is done."""
    from tests.ui.conftest import AT

    lazy = FleetService.load(demo_fleet, eager=False, at=AT)
    app = EscortApp(lazy, config=UIConfig(), at=AT, live=True)
    total = len(app.vm_rows())
    starts: list[int] = []
    original = EscortApp._load_stub_views

    def stub(self: EscortApp) -> None:
        original(self)
        starts.append(len(seen))

    seen = record_titles(app, monkeypatch)
    monkeypatch.setattr(EscortApp, "_load_stub_views", stub)
    steps = lazy.check_in_steps

    def slow_start(**kw: object):  # type: ignore[no-untyped-def]
        # a 28-VM check can end within the loop turn that would show its first title; a
        # few empty steps first (as a big fleet's check has while its hosts are checked)
        # give the screen the turns to show "checking 0 of 28" before any verdict
        for _ in range(20):
            yield []
        yield from steps(**kw)  # type: ignore[arg-type]

    lazy.check_in_steps = slow_start  # type: ignore[method-assign]
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(500):
            await settle(app)
            await pilot.pause(0.02)
            if starts and not app.refreshing and not app.checking:
                break
        assert starts, "the refresh did not start a new check"
        assert not app.checking and decided_rows(app) == total
        bar = str(app.screen.query_one(".title-bar").render())
    after = seen[starts[-1]:]
    assert after and f"checking 0 of {total:,} VMs" in after[0][0], after[:1]
    for line, decided in after:
        if not PROGRESS.search(line):
            assert decided == total, (line, decided)
    assert "checking" not in bar


async def test_a_failed_check_never_reads_as_done(scale_fleet: Path) -> None:
    from console.core.errors import EscortError

    lazy = FleetService.load(scale_fleet, eager=False)
    steps = lazy.check_in_steps

    def broken(**kw: object):  # type: ignore[no-untyped-def]
        for views in steps(**kw):  # type: ignore[arg-type]
            if views:
                yield views[:5]
                raise EscortError("the disk went away")
            yield views

    lazy.check_in_steps = broken  # type: ignore[method-assign]
    app = EscortApp(lazy, config=UIConfig(), live=False)
    total = len(app.vm_rows())
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(200):
            await settle(app)
            await pilot.pause(0.02)
            if app.check_failed:
                break
        bar = str(app.screen.query_one(".title-bar").render())
        decided = decided_rows(app)
    # the rows decided before the failure (the first step's, at most 5), never the whole fleet
    assert 0 < decided <= 5 and f"check FAILED at {decided} of {total:,} VMs" in bar, bar


async def test_the_targets_pane_never_checks_host_chains_during_a_warm_start(
        scale_fleet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a warm start-up check runs, the targets pane of a VM that already has its verdict
    lists every host's verdict from the check (the same matrix as the row) and leaves the
    reasons for after the check: it never checks a host chain itself -- the snapshot holds
    every one of them (counted: no chain is checked at all in a warm launch, reasons
    included). The list during the check is the list after it; the row agrees with both.
    The check is held after its first verdicts so that the pane is asked (as a worker started
    while the row still said "checking…" runs) for a decided VM while the check still runs."""
    from console.core.pki.store import TrustStore
    from console.ui.screens.vms import VMsScreen

    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    chains: list[object] = []
    original_verify = TrustStore.verify_host

    def counted(self: TrustStore, *args: object, **kwargs: object) -> object:
        chains.append(args[0])
        return original_verify(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(TrustStore, "verify_host", counted)

    def pane(app: EscortApp) -> tuple[str, list[tuple[str, str]]]:
        screen = app.screen
        title = str(screen.query_one("#targets-title").render())
        rows = screen.query_one("#targets", VirtualTable).rows_in_view()
        return title, [(r.key, r.cells[0]) for r in rows if r.cells[0]]  # host lines (verdicts)

    # the first launch checks everything (and stores the snapshot): chains are checked then
    lazy = FleetService.load(scale_fleet, eager=False)
    lazy.use_cache = True
    app = EscortApp(lazy, config=UIConfig(), live=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await checked(app, pilot)
    assert lazy.check_source == "computed" and chains  # the counter counts
    chains.clear()

    release: list[bool] = []
    original_steps = FleetService.check_in_steps

    def held(self: FleetService, **kwargs: object):  # type: ignore[no-untyped-def]
        steps = original_steps(self, **kwargs)  # type: ignore[arg-type]
        for views in steps:
            yield views
            if views:
                break  # the first verdicts are out: hold the rest until released
        while not release:
            yield []
        yield from steps

    monkeypatch.setattr(FleetService, "check_in_steps", held)
    lazy = FleetService.load(scale_fleet, eager=False)
    lazy.use_cache = True
    app = EscortApp(lazy, config=UIConfig(), live=False)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        for _ in range(500):
            await pilot.pause(0.02)
            screen = app.screen
            if isinstance(screen, VMsScreen) and screen.is_mounted and screen.query("#targets"):
                key = screen.main_table().cursor_key
                vm = app.vm_by_key(key) if key else None
                if vm is not None and not vm.checking:
                    break
        assert isinstance(screen, VMsScreen) and app.checking
        key = screen.main_table().cursor_key
        assert key is not None
        # the pane is asked again for the VM it shows (a resize, a second highlight, a worker
        # started while its row said "checking…"): the verdicts, never a chain check
        screen._show_targets(key)
        for _ in range(50):
            await pilot.pause(0.02)
            if "listing reasons" in pane(app)[0]:
                break
        during_title, during = pane(app)
        assert app.checking and "listing reasons" in during_title, during_title
        assert chains == []
        release.append(True)
        await checked(app, pilot)
        for _ in range(200):
            await settle(app)
            await pilot.pause(0.02)
            if "Enter: walkthrough" in pane(app)[0]:
                break
        after_title, after = pane(app)
        row = next(r for r in app.vm_rows() if r.key == key)
    assert lazy.check_source == "snapshot"
    assert "Enter: walkthrough" in after_title, after_title  # every reason listed after the check
    assert during == after  # the same hosts, the same verdicts, in the same order
    allowed = sum(1 for _, verdict in after if "allowed" in verdict)
    assert row.cells[4] == f"{allowed}/{len(after)}"
    assert f"{allowed} of " in during_title and f"{allowed} of " in after_title
    assert chains == []  # the snapshot answered every host, the reasons' too


async def test_the_placement_check_after_start_up_marks_what_the_one_go_check_finds(
        scale_fleet: Path) -> None:
    """After the streamed start-up check, the placement check (run in steps on the event loop)
    marks exactly the VMs the shared one-go placement check finds, with the same reasons."""
    from console.services.check import misplaced

    app = EscortApp(FleetService.load(scale_fleet, eager=False), config=UIConfig(), live=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await checked(app, pilot)
        for _ in range(100):
            await settle(app)
            await pilot.pause(0.02)
            if app.misplaced:
                break
        marked = dict(app.misplaced)
        rows = {r.key: r.cells[3] for r in app.vm_rows()}
    expected = {p.uuid: p for p in misplaced(FleetService.load(scale_fleet))}
    assert expected and marked == expected
    assert all(rows[u].startswith("✗ MISPLACED") for u in expected)
