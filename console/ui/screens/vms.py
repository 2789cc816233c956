"""VMs: the table of VMs and, for the selected one, every host as allowed or refused.

The target list is a second virtual table with one line per host plus one per reason
(and its fix), so even 1,000 hosts scroll instantly and ``/`` can search reasons.
Enter on a target opens the walkthrough for that (VM, host) pair.
"""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.timer import Timer
from textual.widgets import Input, Label

from console.core.errors import EscortError
from console.ui.screens.base import FleetScreen
from console.ui.text import BAD, OK, WARN, plural, wrap
from console.ui.widgets.vtable import Column, Row, VirtualTable, make_row

#: The targets pane's reasons are computed in slices of about this long on the event loop. A
#: key press travels through several message pumps (each a task of its own: the app, the
#: table, its containers, the screen, the debounce timer, the refresh) and each hop waits for
#: one slice: short slices keep Down and filter keys within ~100 ms while reasons are listed.
SLICE_S = 0.005


class VMsScreen(FleetScreen):
    screen_label = "VMs"
    has_filter = True
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("w", "walkthrough", "Walk", id="vms.walkthrough"),
        Binding("m", "migrate", "Migrate", id="vms.migrate"),
        Binding("tab", "switch_pane", "Targets", show=False, id="vms.switch"),
    ]

    COLUMNS = (
        Column("VM", 12),
        Column("Owner", 8),
        Column("Host", 12),
        Column("Policy", 16, flex=True),
        Column("Targets", 7),
    )
    TARGET_COLUMNS = (Column("Verdict", 10), Column("Host / reason and fix", 20, flex=True))

    def __init__(self) -> None:
        super().__init__()
        self._pending: Timer | None = None  # the debounce timer; a strong reference on purpose
        self._shown_vm: str | None = None

    def compose(self) -> ComposeResult:
        yield from self.compose_top()
        with Vertical(classes="split"):
            with Vertical(classes="main"):
                yield Input(placeholder="filter VMs (Enter keeps it, Esc clears)", id="filter",
                            classes="filter")
                # "1000/1000" must fit: the Targets column is as wide as the fleet needs
                n = len(self.escort.all_hosts())
                columns = (*self.COLUMNS[:-1], Column("Targets", max(7, 2 * len(str(n)) + 1)))
                yield VirtualTable(columns, id="vms-table", empty_text="no VM matches",
                                   no_rows_text="no VMs in this fleet (press p for problems)")
            with Vertical(classes="side"):
                yield Label("Targets", id="targets-title", classes="pane-title")
                yield VirtualTable(self.TARGET_COLUMNS, id="targets", show_header=False, group_rows=True,
                                   empty_text="select a VM to see where it may go")
        yield from self.compose_bottom()

    def on_mount(self) -> None:
        self.query_one("#filter").display = False
        table = self.query_one("#vms-table", VirtualTable)
        table.set_rows(self.escort.vm_rows())
        table.focus()
        self.escort.verdicts_arrived.subscribe(self, self._verdicts_arrived)
        # the targets are computed after the first paint so the table shows at once
        self.call_after_refresh(self._show_targets, table.cursor_key)

    def _verdicts_arrived(self, keys: frozenset[str]) -> None:
        """The start-up check decided more VMs: their rows now show verdicts."""
        self.main_table().update_rows(self.escort.vm_rows(), keys)
        if self._shown_vm in keys and self.escort.admin is None:
            self._shown_vm = None  # the pane may have used the "checking" state: list again
            self._show_targets(self.main_table().cursor_key)

    def reload(self) -> None:
        table = self.main_table()
        table.set_rows(self.escort.vm_rows())
        self._show_targets(table.cursor_key)

    def main_table(self) -> VirtualTable:
        return self.query_one("#vms-table", VirtualTable)

    # ------------------------------------------------------------ targets
    def on_virtual_table_highlighted(self, event: VirtualTable.Highlighted) -> None:
        if event.table.id != "vms-table":
            return
        if self._pending is not None:
            self._pending.stop()
        key = event.key
        # holding an arrow key should not compute targets for every VM passed over, and
        # while the operator types a filter the targets wait until typing pauses
        box = self.filter_input()
        delay = 0.3 if box is not None and box.has_focus else 0.03
        self._pending = self.set_timer(delay, lambda: self._show_targets(key))

    def _show_targets(self, vm_key: str | None) -> None:
        """Ask for every host's decision in a cooperative worker: with 1,000 hosts the trust
        core needs seconds, and the table must keep answering keys meanwhile."""
        # ``self._pending`` is deliberately not cleared here: Textual keeps timers only
        # weakly, so dropping the reference to a newer, still-pending timer (this call may
        # come from an older one) lets the garbage collector cancel it silently.
        targets = self.query_one("#targets", VirtualTable)
        title = self.query_one("#targets-title", Label)
        same_vm = vm_key == self._shown_vm
        self._shown_vm = vm_key
        if vm_key is None:
            title.update("Targets", layout=False)  # height 1, width 1fr: no relayout
            targets.set_rows([], keep_key=False)
            return
        vm = self.escort.vm_by_key(vm_key)
        name = vm.name if vm is not None else vm_key
        if not same_vm:
            title.update(f"Targets for {name}: checking every host…", layout=False)
            targets.set_rows([], keep_key=False)
        width = max(targets.size.width - self.TARGET_COLUMNS[0].width - 2, 30)
        self._compute_targets(vm_key, name, width, same_vm)

    @work(exclusive=True, group="targets", exit_on_error=False)
    async def _compute_targets(self, vm_key: str, name: str, width: int, keep: bool) -> None:
        """One decision per host, yielding to the event loop every few hosts.

        Not a thread: the fleet service keeps caches that are not thread-safe, and a
        walkthrough or a refresh may use it meanwhile. Yielding keeps every key press
        answered within a few milliseconds even when 1,000 hosts take seconds; a newer
        selection cancels this one at its next yield (exclusive worker).
        """
        service = self.escort.service
        admin = self.escort.admin
        hosts = [h.name for h in self.escort.all_hosts()]
        vm = self.escort.vm_by_key(vm_key)
        if vm is not None and vm.checking:
            # the start-up check decides this VM soon (its verdict re-lists this pane);
            # deciding it here too would redo, ahead of the check, what the check reuses
            self._targets_ready(vm_key, f"Targets for {name}: checking…", [], keep)
            return
        checking = self.escort.checking
        if vm is not None and admin is None and (not keep or checking):
            # Every host's verdict at once, from the same allowed-target matrix as the VM's
            # row (so row and pane agree); the reasons for each refusal follow below.
            # (While the start-up check runs, also for the VM already in the pane: this
            # worker may have been started while its row still said "checking…".)
            allowed_set = set(vm.allowed_targets)
            quick = sorted(hosts, key=lambda h: (h not in allowed_set, h))
            self._targets_ready(
                vm_key, f"Targets for {name}: {len(allowed_set)} of {plural(len(hosts), 'host')} allowed"
                " — listing reasons…",
                [make_row(h, [f"{OK} allowed", h], ["ok", "strong"]) if h in allowed_set
                 else make_row(h, [f"{BAD} refused", h], ["bad", "strong"]) for h in quick], keep)
            keep = True
            await asyncio.sleep(0)
        if self.escort.checking:
            # The reasons (a full decision per host; acting as an admin, every decision: its
            # grants count) follow when the start-up check is done: its end re-lists this
            # pane. Computed now, each host's chain would be checked here, ahead of the check
            # that restores or checks it anyway, and slow that check down.
            if admin is not None:
                self._targets_ready(vm_key, f"Targets for {name}: checking…", [], keep)
            return
        decisions = []
        at = getattr(service, "at", None)  # one time for the whole list (and its caches)
        try:
            last = time.perf_counter()
            for host in hosts:
                decisions.append(service.explain(vm_key, host, admin, at))
                if time.perf_counter() - last > SLICE_S:  # keys pass between slices
                    await asyncio.sleep(0)
                    last = time.perf_counter()
        except EscortError as exc:
            self._targets_failed(vm_key, str(exc))
            return
        decisions.sort(key=lambda d: (not d.allowed, d.host))
        rows: list[Row] = []
        allowed = 0
        # reasons are wrapped to the pane (not truncated): the fix is the useful part. Wrapping
        # 1,000 hosts' reasons takes ~50-100 ms: keys are answered between slices here too
        last = time.perf_counter()
        for decision in decisions:
            if time.perf_counter() - last > SLICE_S:
                await asyncio.sleep(0)
                last = time.perf_counter()
            host = decision.host
            if decision.allowed:
                allowed += 1
                rows.append(make_row(host, [f"{OK} allowed", host], ["ok", "strong"]))
            else:
                rows.append(make_row(host, [f"{BAD} refused", host], ["bad", "strong"]))
            for reason in decision.reasons:
                mark = WARN if reason.severity == "warning" else "•"
                for line in wrap(f"{mark} {reason.message} [{reason.code}]", width - 2, "  "):
                    rows.append(make_row(host, ["", "  " + line]))
                if reason.fix:
                    for line in wrap(f"fix: {reason.fix}", width - 4, "     "):
                        rows.append(make_row(host, ["", "    " + line], ["", "dim"]))
        title = (f"Targets for {name}: {allowed} of {plural(len(decisions), 'host')} allowed"
                 " — Enter: walkthrough")
        self._targets_ready(vm_key, title, rows, keep, (allowed, len(decisions)))

    def _targets_ready(self, vm_key: str, title: str, rows: list[Row], keep: bool,
                       counts: tuple[int, int] | None = None) -> None:
        if vm_key != self._shown_vm:
            return  # the operator has moved on
        self.query_one("#targets-title", Label).update(title, layout=False)
        self.query_one("#targets", VirtualTable).set_rows(rows, keep_key=keep)
        if counts is not None:  # the VM's row says what the pane says, always
            row = self.escort.agree_vm_targets(vm_key, *counts)
            if row is not None:
                self.main_table().replace_row(row)

    def _targets_failed(self, vm_key: str, message: str) -> None:
        if vm_key == self._shown_vm:
            self.query_one("#targets-title", Label).update(f"{BAD} {message}", layout=False)
            self.escort.notify(message, severity="error", markup=False)

    def on_resize(self) -> None:
        super().on_resize()
        if self._shown_vm is not None:
            self.call_after_refresh(self._show_targets, self._shown_vm)

    # ------------------------------------------------------------ actions
    def _pair(self) -> tuple[str, str] | None:
        vm_key = self.main_table().cursor_key
        host = self.query_one("#targets", VirtualTable).cursor_key
        if vm_key is None:
            self.notify("Select a VM first.", timeout=3)
            return None
        if host is None or self._shown_vm != vm_key:
            self.notify("Select a target host first (Tab moves to the targets).", timeout=3)
            return None
        return vm_key, host

    def on_virtual_table_chosen(self, event: VirtualTable.Chosen) -> None:
        if event.table.id == "vms-table":
            if self._pending is not None:
                self._pending.stop()
                self._show_targets(event.key)
            self.query_one("#targets", VirtualTable).focus()
        else:
            self.action_walkthrough()

    def action_switch_pane(self) -> None:
        table = self.main_table()
        targets = self.query_one("#targets", VirtualTable)
        (targets if table.has_focus else table).focus()

    def action_walkthrough(self) -> None:
        pair = self._pair()
        if pair is not None:
            self.escort.open_walkthrough(*pair)

    def action_migrate(self) -> None:
        pair = self._pair()
        if pair is not None:
            self.escort.request_migration(*pair)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "migrate" and self.escort.readonly:
            return False  # hidden and inert; the service refuses it anyway
        return super().check_action(action, parameters)

    def focus_vm(self, key: str) -> bool:
        return self.main_table().move_to_key(key)

    def copy_text(self) -> str:
        targets = self.query_one("#targets", VirtualTable)
        title = str(self.query_one("#targets-title", Label).render())
        lines = [title]
        for row in targets.rows_in_view():
            lines.append("  ".join(c for c in row.cells if c).rstrip())
        return "\n".join(lines)
