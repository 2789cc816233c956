"""Emergency evacuation board: plan, edit, confirm, run in parallel, summary.

Hosts screen ``e`` on a host → the plan is computed in a worker (hosts refreshed
first: capacity comes from libvirt's answers) → one board: every move (VM, from, to,
memory) and, below, every stuck VM with the reasons per candidate host and the owner
to call. ``t`` retargets a VM among its allowed hosts, ``d`` drops it, ``g`` asks for
"evacuate" to be typed and runs the plan with the service's bounded parallelism;
each VM's phase and progress then show on its row (``a`` aborts one, ``A`` all). At
the end the summary replaces the stuck list and ``c`` copies it (OSC 52).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label, OptionList, Static
from textual.widgets.data_table import CellDoesNotExist, RowDoesNotExist
from textual.widgets.option_list import Option

from console.core.errors import EscortError
from console.core.evacuation import group_reasons
from console.ui.screens.base import FleetScreen
from console.ui.screens.migrations import hub_for
from console.ui.text import BAD, OK, WARN, plural
from console.ui.widgets.dialogs import ConfirmDialog
from console.ui.widgets.progress import human_bytes

if TYPE_CHECKING:
    from console.services.evacuation import (
        EvacuationRun,
        EvacuationService,
        PlannedEvacuation,
        Summary,
        VMUpdate,
    )
    from console.ui.app import EscortApp

CONFIRM_WORD = "evacuate"
#: fits the 15-column Phase cell with a percentage
SHORT_PHASE = {"preflight": "pre-flight", "starting": "start", "copying": "copy",
               "converging": "converge", "switchover": "switch-over", "verifying": "verify"}


def open_evacuation(app: EscortApp, hosts: list[str]) -> None:
    """Open the board for ``hosts`` (planning is allowed read-only; running is not)."""
    why = hub_for(app).unavailable()
    if why:
        app.notify(why, severity="error", markup=False)
        return
    app.push_screen(EvacuationScreen(hosts))


def phase_cell(update: VMUpdate) -> str:
    """Phase in words with a glyph (colour is never the only signal)."""
    if update.phase == "moved":
        return f"{OK} moved"
    if update.phase in ("failed", "aborted"):
        return f"{BAD} {update.phase}"
    word = SHORT_PHASE.get(update.phase, update.phase)
    p = update.progress
    if p is not None and p.fraction is not None and update.phase in ("copying", "converging"):
        return f"… {word} {p.fraction * 100:.0f}%"
    return f"… {word}" if update.phase != "queued" else "queued"


def note_cell(update: VMUpdate) -> str:
    if update.phase == "moved":
        down = update.progress.downtime_ms if update.progress else None
        return f"on {update.vm_on}" + (f", down {down} ms" if down is not None else "")
    if update.phase in ("failed", "aborted"):
        where = f"still on {update.vm_on}" if update.vm_on else "NOT verified: reconcile"
        return f"{where}: {update.message}"
    p = update.progress
    if p is not None and p.data_processed:
        return f"{human_bytes(p.data_processed)} at {human_bytes(p.rate_bps)}/s"
    return update.message


class ChooseTarget(ModalScreen["str | None"]):
    """Pick a new target among the VM's allowed hosts (the planner checks room)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel", id="choose.cancel")]
    DEFAULT_CSS = """
    ChooseTarget { align: center middle; }
    ChooseTarget > Vertical { width: 50; max-width: 95%; height: auto; max-height: 80%;
        border: thick $primary; background: $panel; padding: 0 1; }
    ChooseTarget OptionList { height: auto; max-height: 14; }
    """

    def __init__(self, vm: str, current: str, hosts: list[str]) -> None:
        super().__init__()
        self.vm, self.current, self.hosts = vm, current, hosts

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"New target for {self.vm} (Enter picks, Esc cancels):")
            yield OptionList(*[Option(f"{h}{'  (current)' if h == self.current else ''}", id=h)
                               for h in self.hosts])

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class EvacuationScreen(FleetScreen):
    """The plan and, once confirmed, the progress board of one evacuation."""

    screen_label = "Evacuate"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("t", "retarget", "Retarget", id="evac.retarget"),
        Binding("d", "drop", "Drop", id="evac.drop"),
        Binding("g", "run", "Run…", id="evac.run"),
        Binding("a", "abort", "Abort VM", id="evac.abort"),
        Binding("A", "abort_all", "Abort all", id="evac.abort_all"),
        Binding("c", "copy", "Copy", id="evac.copy"),
        Binding("escape", "back", "Back", id="evac.back"),
    ]
    DEFAULT_CSS = """
    EvacuationScreen #ev-status { height: auto; text-style: bold; }
    EvacuationScreen #ev-board { height: 1fr; min-height: 5; }
    EvacuationScreen #ev-lower { height: 1fr; max-height: 12; border-top: solid $primary; }
    """

    def __init__(self, hosts: list[str]) -> None:
        super().__init__()
        self.hosts = hosts
        self.service: EvacuationService | None = None
        self.planned: PlannedEvacuation | None = None
        self.run: EvacuationRun | None = None
        self.summary: Summary | None = None
        self._latest: dict[str, VMUpdate] = {}
        self._changed: set[str] = set()

    @property
    def is_modal_like(self) -> bool:
        return True

    def compose(self) -> ComposeResult:
        yield from self.compose_top()
        yield Static(f"Planning the evacuation of {', '.join(self.hosts)}: refreshing hosts…",
                     id="ev-status", markup=False)
        table: DataTable[str] = DataTable(id="ev-board", cursor_type="row", zebra_stripes=True)
        # fixed widths: phases and notes change during the run, and a DataTable sizes
        # columns by their first content; the note takes what is left (80 columns: 19)
        widths = {"VM": 12, "From": 7, "To": 7, "MiB": 6, "Phase": 15}
        note = max(18, self.app.size.width - sum(widths.values()) - 2 * (len(widths) + 1) - 2)
        for label, width in [*widths.items(), ("Note", note)]:
            table.add_column(label, width=width)
        yield table
        with VerticalScroll(id="ev-lower"):
            yield Static("", id="ev-detail", markup=False)
        yield from self.compose_bottom()

    def on_mount(self) -> None:
        self.sub_title = "evacuation"
        self.query_one("#ev-board", DataTable).focus()
        self.set_interval(0.5, self._redraw_running)
        self.compute_plan()

    # -- planning --------------------------------------------------------------------
    @work(exclusive=True, group="evac-plan", exit_on_error=False)
    async def compute_plan(self) -> None:
        """Refresh every host (room and reachability come from libvirt), then plan.

        On the event loop, not a thread: the fleet service is not thread-safe; planning
        itself is fast (500 VMs over 1,000 hosts in well under a second)."""
        from console.services.evacuation import EvacuationService
        from console.services.fleet import FleetService

        app = self.escort
        fleet = app.service
        assert isinstance(fleet, FleetService)
        status = self.query_one("#ev-status", Static)
        try:
            results = await app.inventory_service().refresh()
            down = sorted(n for n, r in results.items() if r.facts is None)
            app.load_views()
            admins = app.admin_ids()
            # the fleet's only admin is the one acting (as the migration pre-flight assumes)
            admin = app.admin or (admins[0] if len(admins) == 1 else None)
            from console.services.emergency import audit_path, declared

            service = EvacuationService(fleet, admin=admin, emergencies=declared(fleet, audit_path(fleet)))
            planned = service.plan(self.hosts, explain=False)
            service.explain_stuck(planned)
        except EscortError as exc:
            status.update(f"{BAD} Could not plan: {exc}")
            return
        self.service, self.planned = service, planned
        note = f" ({plural(len(down), 'host')} did not answer: {', '.join(down[:4])})" if down else ""
        self._show_plan(note)

    def _show_plan(self, note: str = "") -> None:
        planned = self.planned
        if planned is None:
            return
        table: DataTable[str] = self.query_one("#ev-board", DataTable)
        keep = self._cursor_uuid()
        table.clear()
        for m in planned.moves:
            table.add_row(m.vm.name, m.vm.source, m.target, str(m.vm.memory_mib), "planned", "",
                          key=m.vm.uuid)
        if keep is not None:
            for n, m in enumerate(planned.moves):
                if m.vm.uuid == keep:
                    table.move_cursor(row=n)
        stuck = len(planned.stuck) + len(planned.held)
        self.query_one("#ev-status", Static).update(
            f"{planned.title or 'evacuation'}: {plural(len(planned.moves), 'move')}, "
            f"{stuck} cannot move{note}. t retarget · d drop · g run")
        self.query_one("#ev-detail", Static).update("\n".join(self._plan_detail()))

    def _plan_detail(self) -> list[str]:
        planned = self.planned
        assert planned is not None
        out: list[str] = []
        for r in planned.notes:
            out.append(f"{WARN} {r.message}")
        if planned.stuck:
            out.append(f"{BAD} Stuck — no allowed target with room; call the owner:")
            for s in planned.stuck:
                out.append(f"  {s.vm.name} on {s.vm.source}: call {s.owner_to_contact}")
                for reason, hosts in group_reasons(s.why_not):
                    shown = ", ".join(hosts[:4]) + (f" +{len(hosts) - 4}" if len(hosts) > 4 else "")
                    out.append(f"    {shown}: {reason.message} [{reason.code}]")
                if not s.why_not:
                    out.append("    no other host in the fleet")
        for v, r in planned.held:
            out.append(f"{BAD} {v.name} on {v.source} cannot move: {r.message} (owner {v.owner})")
        if planned.plan.dropped:
            out.append("Dropped by you (stay where they are): "
                       + ", ".join(v.name for v in planned.plan.dropped))
        if not out:
            out.append(f"{OK} Every VM on {', '.join(planned.sources)} has an allowed target with room.")
        return out

    def _cursor_uuid(self) -> str | None:
        table: DataTable[str] = self.query_one("#ev-board", DataTable)
        if table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except CellDoesNotExist:  # an empty or refreshing table has no cursor row
            return None
        return str(key) if key is not None else None

    # -- editing ---------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        running = self.run is not None and self.summary is None
        if action in ("retarget", "drop", "run"):
            if action == "run" and self.escort.readonly:
                return False
            return self.run is None
        if action in ("abort", "abort_all"):
            return running and not self.escort.readonly
        return super().check_action(action, parameters)

    def action_retarget(self) -> None:
        uuid = self._cursor_uuid()
        if self.planned is None or uuid is None:
            self.notify("No planned move selected.", timeout=3)
            return
        move = self.planned.find(uuid)
        hosts = sorted(h for h in move.vm.allowed if h != move.vm.source)
        if len(hosts) < 2:
            self.notify(f"{move.vm.name} has no other allowed host than {move.target}.", timeout=4,
                        markup=False)
            return

        def chosen(host: str | None) -> None:
            if host is None or self.planned is None or host == move.target:
                return
            why = self.planned.retarget(uuid, host)
            if why is not None:
                self.notify(f"{move.vm.name} cannot go to {host}: {why.message}", severity="error",
                            markup=False)
                return
            self._show_plan()
            self.notify(f"{move.vm.name} will go to {host}.", timeout=3, markup=False)

        self.app.push_screen(ChooseTarget(move.vm.name, move.target, hosts), chosen)

    def action_drop(self) -> None:
        uuid = self._cursor_uuid()
        if self.planned is None or uuid is None:
            self.notify("No planned move selected.", timeout=3)
            return
        name = self.planned.find(uuid).vm.name
        self.planned.drop(uuid)
        self._show_plan()
        self.notify(f"{name} dropped: it stays where it is.", timeout=3, markup=False)

    # -- running ---------------------------------------------------------------------
    def action_run(self) -> None:
        planned = self.planned
        if planned is None:
            self.notify("The plan is not ready yet.", timeout=3)
            return
        if not planned.moves:
            self.notify("Nothing to move in this plan.", timeout=3)
            return
        from console.services.evacuation import Limits

        limits = Limits()
        body = (f"Move {plural(len(planned.moves), 'VM')} off {', '.join(planned.sources)} now, "
                f"at most {limits.parallel} at once ({limits.per_source} per source, "
                f"{limits.per_target} per target), each after its own pre-flight, over TLS.\n"
                f"{len(planned.stuck) + len(planned.held)} VM(s) cannot move and stay.")

        def answered(ok: bool | None) -> None:
            if ok:
                self._start(limits)

        self.app.push_screen(ConfirmDialog(f"Evacuate {', '.join(planned.sources)}?", body,
                                           confirm_label="Evacuate", type_to_confirm=CONFIRM_WORD),
                             answered)

    def _start(self, limits: Any) -> None:
        from console.services.evacuation import InventoryLocator, MigrationMover

        assert self.service is not None and self.planned is not None
        hub = hub_for(self.escort)
        try:
            if not hub.demo:
                migrations = hub.service
                self.service.mover = MigrationMover(migrations)
                self.service.locator = InventoryLocator(self.escort.inventory_service(), migrations.fleet)
                self.service.audit = migrations.audit  # one hash chain with the migrations
            run = self.service.start(self.planned, limits=limits)
        except EscortError as exc:
            self.escort.notify(f"Not started: {exc}", severity="error", markup=False)
            self.query_one("#ev-status", Static).update(f"{BAD} Not started: {exc}")
            return
        self.run = run
        queue = run.queue()
        # the run belongs to the app: it goes on even if this board is closed
        self.app.run_worker(self._run(run), group="evacuation", exit_on_error=False)
        self._consume(queue)
        self.refresh_bindings()
        self.query_one("#ev-status", Static).update(
            f"Evacuating {', '.join(self.planned.sources)}: a aborts the selected VM, A aborts all.")

    async def _run(self, run: Any) -> None:
        """Run to the end; a refusal before the first move (e.g. the admin's key is not
        present) is shown, nothing having moved."""
        try:
            await run.run()
        except EscortError as exc:
            self.escort.notify(f"Not started: {exc}", severity="error", markup=False)
            with contextlib.suppress(Exception):
                self.query_one("#ev-status", Static).update(f"{BAD} Not started: {exc}")

    @work(group="evac-events", exit_on_error=False)
    async def _consume(self, queue: Any) -> None:
        from console.services.evacuation import RunFinished

        while True:
            event = await queue.get()
            if isinstance(event, RunFinished):
                self._finished(event.summary)
                return
            self._latest[event.uuid] = event
            self._changed.add(event.uuid)

    def _redraw_running(self) -> None:
        """Latest state of every VM that changed, at most twice a second."""
        if not self._changed:
            return
        table: DataTable[str] = self.query_one("#ev-board", DataTable)
        for uuid in list(self._changed):
            update = self._latest[uuid]
            try:
                table.update_cell(uuid, table.ordered_columns[4].key, phase_cell(update))
                table.update_cell(uuid, table.ordered_columns[5].key, note_cell(update))
            except (CellDoesNotExist, RowDoesNotExist):  # a dropped VM is not on the board
                pass
        self._changed.clear()

    def _finished(self, summary: Summary) -> None:
        self._redraw_running()
        self.summary = summary
        self.refresh_bindings()
        self.query_one("#ev-status", Static).update(
            f"Done: {len(summary.moved)} moved, {len(summary.failed)} failed, "
            f"{len(summary.stuck) + len(summary.held)} not movable. c copies the summary.")
        self.query_one("#ev-detail", Static).update(summary.text())
        self.escort.load_views()
        self.escort.fleet_changed.publish(None)

    def action_abort(self) -> None:
        uuid = self._cursor_uuid()
        if self.run is None or uuid is None:
            return
        name = self.run.board[uuid].name if uuid in self.run.board else uuid

        def answered(ok: bool | None) -> None:
            if ok and self.run is not None and not self.run.abort(uuid):
                self.notify(f"{name} has already finished.", timeout=3, markup=False)

        self.app.push_screen(ConfirmDialog(f"Abort moving {name}?",
                                           f"{name} stays on (or returns to) its source; the board "
                                           "shows where it runs, checked.", confirm_label="Abort VM"),
                             answered)

    def action_abort_all(self) -> None:
        def answered(ok: bool | None) -> None:
            if ok and self.run is not None:
                self.run.abort_all()

        self.app.push_screen(ConfirmDialog("Abort the whole evacuation?",
                                           "Queued VMs never start; running moves are aborted. Every "
                                           "VM ends on exactly one host (checked).",
                                           confirm_label="Abort all"), answered)

    def action_back(self) -> None:
        if self.run is not None and self.summary is None:
            self.notify("The evacuation is running: A aborts it; the board closes after.", timeout=4)
            return
        self.dismiss()

    def copy_text(self) -> str:
        if self.summary is not None:
            return self.summary.text()
        if self.planned is not None:
            return "\n".join(self.planned.lines())
        return ""


__all__ = ["ChooseTarget", "EvacuationScreen", "open_evacuation"]
