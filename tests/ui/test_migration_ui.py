"""Pilot tests of the migration and evacuation screens on the seeded demo fleet (80x24).

The demo runs on libvirt's test driver: the full pre-flight runs, then the console
says plainly that live migration needs real hosts; an evacuation plans, can be
edited, and refuses to run. The lab test (tests/integration/test_console_lab.py)
drives the same screens through a real migration.
"""

from __future__ import annotations

from collections.abc import Callable

from textual.app import App, ComposeResult
from textual.pilot import Pilot
from textual.widgets import Button, DataTable, Input, Label, OptionList, ProgressBar, Static

from console.core.migration import Outcome, Progress
from console.ui.app import EscortApp
from console.ui.screens.evacuation import ChooseTarget, EvacuationScreen
from console.ui.screens.migrations import MigrationsScreen, PreflightScreen
from console.ui.screens.vms import VMsScreen
from console.ui.widgets.dialogs import ConfirmDialog
from console.ui.widgets.progress import MigrationPanel
from console.ui.widgets.vtable import VirtualTable
from tests.ui.conftest import opened, settle

SIZE = (80, 24)
MakeApp = Callable[..., EscortApp]


def text_of(app: App[None], selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


async def select_vm(app: EscortApp, pilot: Pilot[None], name: str) -> str:
    key = next(v.uuid for v in app.all_vms() if v.name == name)
    assert app.screen.query_one("#vms-table", VirtualTable).move_to_key(key)
    await pilot.pause(0.2)
    await settle(app)
    await pilot.pause()
    return key


async def wait_for(pilot: Pilot[None], cond: Callable[[], bool], what: str, tries: int = 200) -> None:
    for _ in range(tries):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_migrate_on_demo_runs_preflight_then_says_it_needs_real_hosts(make_app: MakeApp) -> None:
    app = make_app()
    app.admin = "oncall"
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await select_vm(app, pilot, "pay-db-01")
        await pilot.press("tab")
        assert app.screen.query_one("#targets", VirtualTable).cursor_key == "fra-02"
        await pilot.press("m")
        await wait_for(pilot, lambda: isinstance(app.screen, PreflightScreen), "the pre-flight")
        screen = app.screen
        assert isinstance(screen, PreflightScreen)
        focused = app.focused
        assert isinstance(focused, Button) and focused.id == "cancel"
        await wait_for(pilot, lambda: screen.result is not None, "the pre-flight result")
        await pilot.pause()
        checks = text_of(app, "#pf-checks")
        for title in ("placement policy", "allowed set", "grant", "certificate", "reachable",
                      "running on the source", "room"):
            assert title in checks, title
        assert checks.count("✓") == 7 and "✗" not in checks
        verdict = text_of(app, "#pf-verdict")
        assert "Every check passed" in verdict and "needs real hosts" in verdict
        assert "escort lab up" in verdict
        assert screen.query_one("#go", Button).disabled  # nothing pretends to migrate
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, VMsScreen)
        await pilot.press("4")
        await wait_for(pilot, lambda: isinstance(app.screen, MigrationsScreen), "the Migrations tab")
        await pilot.pause()
        assert "needs real hosts" in text_of(app, "#mig-empty")
        assert not list(app.screen.query(MigrationPanel))


async def test_preflight_lists_each_failed_check_with_its_reasons(make_app: MakeApp) -> None:
    app = make_app()
    app.admin = "night-shift"  # its grant covers label web, signed by carol: not alice's pay-db-01
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await select_vm(app, pilot, "pay-db-01")
        await pilot.press("tab", "m")
        await wait_for(pilot, lambda: isinstance(app.screen, PreflightScreen), "the pre-flight")
        screen = app.screen
        assert isinstance(screen, PreflightScreen)
        await wait_for(pilot, lambda: screen.result is not None, "the pre-flight result")
        await pilot.pause()
        checks = text_of(app, "#pf-checks")
        assert "✗ admin's grant covers this VM now — FAILED" in checks
        assert "signed by carol" in checks
        assert "Refused" in text_of(app, "#pf-verdict")
        assert screen.query_one("#go", Button).disabled


async def test_preflight_without_an_admin_says_how_to_choose_one(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await select_vm(app, pilot, "pay-db-01")
        await pilot.press("tab", "m")
        await wait_for(pilot, lambda: isinstance(app.screen, PreflightScreen), "the pre-flight")
        await settle(app)
        await pilot.pause()
        assert "Act as admin" in text_of(app, "#pf-checks")


async def test_readonly_blocks_migrate_and_evacuate(make_app: MakeApp) -> None:
    app = make_app(readonly=True)
    app.admin = "oncall"
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        key = await select_vm(app, pilot, "pay-db-01")
        assert app.screen.check_action("migrate", ()) is False
        await pilot.press("tab", "m")
        await pilot.pause()
        assert not isinstance(app.screen, PreflightScreen | ConfirmDialog)
        app.request_migration(key, "fra-02")  # called directly: refused with one line
        await pilot.pause()
        assert not isinstance(app.screen, PreflightScreen)
        assert "read-only" in app.last_error
        # the evacuation board opens (planning changes nothing) but cannot run
        app.request_evacuation(["fra-01"])
        await wait_for(pilot, lambda: isinstance(app.screen, EvacuationScreen), "the board")
        board = app.screen
        assert isinstance(board, EvacuationScreen)
        await wait_for(pilot, lambda: board.planned is not None, "the plan")
        assert board.check_action("run", ()) is False
        await pilot.press("g")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmDialog) and board.run is None


async def test_evacuation_board_plans_drops_retargets_and_demo_refuses_to_run(make_app: MakeApp) -> None:
    app = make_app(start_mode="hosts")
    app.admin = "oncall"
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        assert app.screen.query_one("#hosts-table", VirtualTable).move_to_key("fra-02")
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, EvacuationScreen), "the board")
        board = app.screen
        assert isinstance(board, EvacuationScreen)
        await wait_for(pilot, lambda: board.planned is not None, "the plan")
        await pilot.pause()
        planned = board.planned
        assert planned is not None and planned.moves
        table = board.query_one("#ev-board", DataTable)
        assert table.row_count == len(planned.moves)
        on_host = {v.name for v in app.all_vms() if v.host == "fra-02"}
        assert {m.vm.name for m in planned.moves} | {s.vm.name for s in planned.stuck} | {
            v.name for v, _ in planned.held} == on_host
        assert "move" in text_of(app, "#ev-status")
        # retarget: the first VM with another allowed host
        row = next(i for i, m in enumerate(planned.moves) if len(m.vm.allowed - {"fra-02"}) >= 2)
        move = planned.moves[row]
        table.move_cursor(row=row)
        await pilot.pause()
        await pilot.press("t")
        await wait_for(pilot, lambda: isinstance(app.screen, ChooseTarget), "the target chooser")
        options = app.screen.query_one(OptionList)
        other = next(i for i in range(options.option_count)
                     if options.get_option_at_index(i).id != move.target)
        new_host = options.get_option_at_index(other).id
        options.highlighted = other
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is board
        assert planned.find(move.vm.uuid).target == new_host
        assert new_host in [str(c) for c in table.get_row(move.vm.uuid)]
        # drop the selected VM: it leaves the board and is listed as staying
        n = len(planned.moves)
        drop_row = next(i for i, m in enumerate(planned.moves) if m.vm.uuid != move.vm.uuid)
        table.move_cursor(row=drop_row)
        first = planned.moves[drop_row].vm.name
        await pilot.press("d")
        await pilot.pause()
        assert len(planned.moves) == n - 1 and table.row_count == n - 1
        assert first in text_of(app, "#ev-detail") and "Dropped" in text_of(app, "#ev-detail")
        # run: confirmation focuses Cancel and wants "evacuate" typed; the demo refuses
        await pilot.press("g")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the confirmation")
        focused = app.focused
        assert isinstance(focused, Button) and focused.id == "cancel"
        confirm = app.screen.query_one("#confirm", Button)
        assert confirm.disabled
        app.screen.query_one("#dialog-typed", Input).value = "evacuate"
        await pilot.pause()
        assert not confirm.disabled
        confirm.press()
        await pilot.pause()
        assert app.screen is board
        assert board.run is None
        assert "test driver" in text_of(app, "#ev-status")
        assert "test driver" in app.last_error
        # c copies the (edited) plan
        copied = board.copy_text()
        assert f"Dropped by the admin: {first}" in copied
        assert f"{move.vm.name}" in copied and f"-> {new_host}" in copied
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is not board


async def test_stuck_vms_listed_with_reasons_per_host_and_owner_to_call(make_app: MakeApp) -> None:
    app = make_app(start_mode="hosts")
    app.admin = "oncall"  # oncall's grants cover the pay-* VMs, not what runs on ber-01
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        app.request_evacuation(["ber-01"])
        await wait_for(pilot, lambda: isinstance(app.screen, EvacuationScreen), "the board")
        board = app.screen
        assert isinstance(board, EvacuationScreen)
        await wait_for(pilot, lambda: board.planned is not None, "the plan")
        await pilot.pause()
        planned = board.planned
        assert planned is not None and not planned.moves and planned.stuck
        detail = text_of(app, "#ev-detail")
        for stuck in planned.stuck:
            assert f"{stuck.vm.name} on ber-01: call {stuck.owner_to_contact}" in detail
        assert "[grant." in detail  # the reason codes per candidate host
        await pilot.press("g")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmDialog)  # nothing to run


class PanelApp(App[None]):
    def compose(self) -> ComposeResult:
        yield MigrationPanel("r1", "app-1", "par-1", "fra-1", id="p")


async def test_progress_panel_is_indeterminate_until_totals_then_shows_outcome() -> None:
    app = PanelApp()
    async with app.run_test(size=SIZE) as pilot:
        panel = app.query_one(MigrationPanel)
        panel.show(Progress("starting", elapsed_s=0.2))
        await pilot.pause()
        assert app.query_one(ProgressBar).total is None
        mib = 1024 * 1024
        panel.show(Progress("copying", elapsed_s=3.0, data_total=100 * mib, data_processed=40 * mib,
                            data_remaining=60 * mib, rate_bps=12 * mib, rate_history=(5 * mib, 12 * mib),
                            dirty_rate_bps=mib, iteration=1, eta_s=5.0))
        await pilot.pause()
        bar = app.query_one(ProgressBar)
        assert bar.total == 100 and round(bar.progress) == 40
        stats = str(app.query_one(".mp-stats", Static).render())
        assert "40.0 MiB sent of 100.0 MiB" in stats and "12.0 MiB/s" in stats and "ETA 5.0 s" in stats
        assert "pass 1" in stats
        done = Progress("completed", elapsed_s=9.0, data_total=100 * mib, data_processed=101 * mib,
                        data_remaining=0, downtime_ms=57)
        panel.show(done, Outcome("success", "fra-1", "verified"))
        await pilot.pause()
        assert "Downtime 57 ms" in str(app.query_one(".mp-stats", Static).render())
        outcome = str(app.query_one(".mp-outcome", Static).render())
        assert "MOVED" in outcome and "fra-1" in outcome and "✓" in outcome
        panel.show(done, Outcome("aborted", "par-1", "operation aborted"))
        await pilot.pause()
        outcome = str(app.query_one(".mp-outcome", Static).render())
        assert "✗ ABORTED" in outcome and "still running on par-1 (checked)" in outcome


class FakeRun:
    """What the Migrations screen reads of a MigrationRun (the lab test uses real ones)."""

    def __init__(self, run_id: str, vm: str, source: str, target: str) -> None:
        from console.core.migration import MigrationPlan

        self.id = run_id
        self.plan = MigrationPlan(vm_uuid=f"{run_id}-uuid", vm_name=vm, source=source, target=target,
                                  tls_name=target, migration_uri=f"tcp://{target}",
                                  cert_fingerprint="ab" * 32)
        self.progress = Progress("starting")
        self.result: object = None
        self.done = False
        self.aborted_by = ""
        self.verifying = False
        self.stopped_waiting = ""

    async def abort(self, who: str = "admin") -> None:
        self.aborted_by = who

    def stop_waiting(self, who: str = "admin") -> None:
        self.stopped_waiting = who


async def test_migrations_tab_panels_per_run_latest_state_abort_and_reconcile_first(
        make_app: MakeApp) -> None:
    from console.core.migration import Copy, ReconcileCase
    from console.ui.screens.migrations import hub_for

    app = make_app(start_mode="migrations")
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        screen = app.screen
        assert isinstance(screen, MigrationsScreen)
        assert screen.check_action("abort", ()) is False  # nothing runs: no Abort key
        hub = hub_for(app)
        one, two = FakeRun("r1", "web-01", "ber-01", "par-01"), FakeRun("r2", "web-02", "par-01", "ams-01")
        for run in (one, two):
            hub.runs.append(run)  # type: ignore[arg-type]
            hub.versions[run.id] = 0
        await pilot.pause(0.7)
        panels = {p.run_id: p for p in screen.query(MigrationPanel)}
        assert set(panels) == {"r1", "r2"}  # several at once, one panel each
        assert screen.check_action("abort", ()) is True
        mib = 1024 * 1024
        # many publications between two redraws: the panel shows the latest only
        for done in range(1, 6):
            one.progress = Progress("copying", elapsed_s=done, data_total=50 * mib,
                                    data_processed=done * 10 * mib, data_remaining=(50 - done * 10) * mib,
                                    rate_bps=10 * mib, rate_history=(9 * mib, 10 * mib))
            hub.versions["r1"] += 1
        await pilot.pause(0.7)
        assert "50.0 MiB sent of 50.0 MiB" in panels["r1"].plain()
        assert "0 B sent of ?" in panels["r2"].plain()  # untouched
        # a: with two running, the focused one; the confirmation starts on Cancel
        panels["r2"].focus()
        await pilot.press("a")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the abort confirmation")
        focused = app.focused
        assert isinstance(focused, Button) and focused.id == "cancel"
        app.screen.query_one("#confirm", Button).press()
        await wait_for(pilot, lambda: two.aborted_by == "admin", "the abort call")
        assert one.aborted_by == ""
        # half-done migrations are listed first, with the one safe resolution
        hub.cases = [ReconcileCase("u1", "web-03", (Copy("ams-01", "paused", "migration"),
                                                   Copy("par-01", "running")),
                                   "reconcile.paused_source", "paused on ams-01, running on par-01",
                                   (("destroy", "ams-01"),))]
        hub.scanned = True
        screen._show_cases()
        await pilot.pause()
        shown = text_of(app, "#reconcile")
        assert "1 VM left half-done" in shown and "safe resolution: destroy on ams-01" in shown
        assert screen.check_action("resolve", ()) is True
        body = screen.query_one("#mig-body")
        assert body.children[0].id == "reconcile"  # shown before the panels


def test_board_cells_say_phase_in_words_and_where_the_vm_is() -> None:
    from console.services.evacuation import VMUpdate
    from console.ui.screens.evacuation import note_cell, phase_cell

    mib = 1024 * 1024
    p = Progress("copying", data_total=100 * mib, data_processed=30 * mib, data_remaining=70 * mib,
                 rate_bps=5 * mib)
    row = VMUpdate("u", "web-01", "ber-01", "par-01", "alice", "copying", progress=p)
    assert phase_cell(row) == "… copy 30%" and note_cell(row) == "30.0 MiB at 5.0 MiB/s"
    done = VMUpdate("u", "web-01", "ber-01", "par-01", "alice", "moved", vm_on="par-01",
                    progress=Progress("completed", downtime_ms=40))
    assert phase_cell(done) == "✓ moved" and note_cell(done) == "on par-01, down 40 ms"
    failed = VMUpdate("u", "web-01", "ber-01", "par-01", "alice", "failed", vm_on="ber-01",
                      message="TLS refused")
    assert phase_cell(failed) == "✗ failed" and note_cell(failed) == "still on ber-01: TLS refused"
    lost = VMUpdate("u", "web-01", "ber-01", "par-01", "alice", "aborted", message="cut")
    assert "NOT verified" in note_cell(lost)


async def test_a_while_verifying_stops_waiting_without_an_abort_dialog(make_app: MakeApp) -> None:
    """Once libvirt has returned there is nothing to cancel: `a` ends the wait for a
    silent host at once, and the panel shows whom it waited for with a countdown."""
    from console.ui.screens.migrations import hub_for

    app = make_app(start_mode="migrations")
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        screen = app.screen
        hub = hub_for(app)
        run = FakeRun("r9", "app-1", "fra-1", "par-1")
        run.verifying = True
        run.progress = Progress("verifying", message="waiting for par-1 (par-1: no answer yet) — 14 s left; "
                                "stop waiting: a (console) / Ctrl-C (CLI)")
        hub.runs.append(run)  # type: ignore[arg-type]
        hub.versions[run.id] = 0
        def phase_text() -> str:
            panels = [p for p in screen.query(MigrationPanel) if p.run_id == "r9"]
            # a panel is listed before its children are composed: no label yet means no text yet
            labels = list(panels[0].query(".mp-phase").results(Label)) if panels else []
            return str(labels[0].render()) if labels else ""

        await wait_for(pilot, lambda: "waiting for par-1" in phase_text(), "the countdown in the panel")
        assert "14 s left" in phase_text()
        panel = next(p for p in screen.query(MigrationPanel) if p.run_id == "r9")
        panel.focus()
        await pilot.press("a")
        await wait_for(pilot, lambda: run.stopped_waiting == "admin", "stop waiting")
        assert not isinstance(app.screen, ConfirmDialog) and run.aborted_by == ""
