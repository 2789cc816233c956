"""Live migration in the console: pre-flight checklist, confirmation, progress panels, reconcile.

The app holds one ``MigrationHub`` (``hub_for(app)``): the migration service over the
app's own fleet and inventory (one SSH pool, one audit log), and every run this
console started. Screens never poll libvirt themselves; the service publishes
progress (at most every 0.5 s) and the Migrations screen redraws the panels whose
state changed on a 0.5 s timer — latest state only, so a burst of updates can never
queue up behind the UI.

Flow: VMs screen ``m`` → ``PreflightScreen`` (every check ✓/✗ with its reasons, run
in a worker) → ``ConfirmDialog`` (Cancel focused, type the VM's name) → ``start`` →
the Migrations tab shows the panel. On the demo fleet the full pre-flight runs and
then says plainly that live migration needs real hosts.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, ClassVar, cast

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

from console.core import migration as mig
from console.core.errors import EscortError
from console.ui.screens.base import FleetScreen
from console.ui.text import BAD, OK, WARN, plural
from console.ui.widgets.dialogs import ConfirmDialog
from console.ui.widgets.progress import MigrationPanel

if TYPE_CHECKING:
    from console.services.migration import MigrationRun, MigrationService
    from console.ui.app import EscortApp

NEEDS_REAL_HOSTS = ("Live migration needs real hosts. This demo runs on libvirt's test driver, "
                    "which cannot migrate, so nothing was started and nothing pretends to move. "
                    "Start real hosts with `escort lab up` (root) and open the console with "
                    "`escort --fleet <lab>/fleet.toml` (or `escort demo --lab`).")


class MigrationHub:
    """The console's migration service and the runs it started (one per app)."""

    def __init__(self, app: EscortApp) -> None:
        self.app = app
        self._service: MigrationService | None = None
        self.runs: list[MigrationRun] = []
        self.versions: dict[str, int] = {}  # run id -> publications seen (the screen redraws changes)
        self.cases: list[mig.ReconcileCase] = []
        self.scanned = False
        self.cases_version = 0  # bumped by every scan (the screen redraws the list)
        self._ended: set[str] = set()

    def unavailable(self) -> str:
        """Why this console cannot migrate at all ("" when it can)."""
        from console.services.fleet import FleetService

        if not isinstance(self.app.service, FleetService) or self.app.service.spec is None:
            return "this console has no fleet file loaded, so there is nothing to migrate"
        return ""

    @property
    def service(self) -> MigrationService:
        """The migration service, made on first use over the app's fleet and inventory."""
        if self._service is None:
            from console.services.fleet import FleetService
            from console.services.migration import MigrationService

            why = self.unavailable()
            if why:
                raise EscortError(why)
            self._service = MigrationService(cast(FleetService, self.app.service),
                                             self.app.inventory_service())
        return self._service

    @property
    def demo(self) -> bool:
        return self.app.service.kind == "demo"

    async def start(self, pf: mig.Preflight) -> MigrationRun:
        """Start (the service re-checks read-only, age and the plan) and track the run."""
        run = await self.service.start(pf)
        self.runs.append(run)
        self.versions[run.id] = 0
        run.subscribe(self._published)
        return run

    def _published(self, run: MigrationRun, _progress: mig.Progress) -> None:
        # called on the loop thread; only counts — the screen's timer draws the latest state
        self.versions[run.id] = self.versions.get(run.id, 0) + 1
        if run.done and run.id not in self._ended:
            self._ended.add(run.id)
            # the VM moved (or not): re-read every host so the other tabs show where it is
            if not self.app.refreshing:
                self.app.call_later(self.app.action_refresh)

    async def scan(self) -> list[mig.ReconcileCase]:
        self.cases = await self.service.reconcile_scan()
        self.scanned = True
        self.cases_version += 1
        return self.cases

    def after_refresh(self) -> None:
        """On start and after every refresh (the app calls this): look for migrations left
        half-done on a live fleet, and say so wherever the operator is."""
        if self.demo or not self.app.live or self.unavailable():
            return
        self.app.run_worker(self._scan_and_tell(), group="reconcile", exclusive=True,
                            exit_on_error=False)

    async def _scan_and_tell(self) -> None:
        try:
            cases = await self.scan()
        except EscortError as exc:
            self.app.notify(f"Could not look for half-done migrations: {exc}", severity="warning",
                            markup=False)
            return
        if cases:
            self.app.notify(f"{plural(len(cases), 'VM')} left half-done by a migration: the "
                            "Migrations tab (4) shows each with its safe fix.", severity="warning",
                            timeout=15, markup=False)

    async def close(self) -> None:
        if self._service is not None:
            await self._service.close()


_HUBS: weakref.WeakKeyDictionary[Any, MigrationHub] = weakref.WeakKeyDictionary()


def hub_for(app: EscortApp) -> MigrationHub:
    hub = _HUBS.get(app)
    if hub is None:
        hub = _HUBS[app] = MigrationHub(app)
    return hub


async def close_hub(app: EscortApp) -> None:
    hub = _HUBS.pop(app, None)
    if hub is not None:
        await hub.close()


# ------------------------------------------------------------------ the migrate flow
def request_migration(app: EscortApp, vm_key: str, host: str) -> None:
    """``m`` on the VMs screen: pre-flight, then confirm, then start."""
    try:
        app.service.require_writable("migrate")
        why = hub_for(app).unavailable()
        if why:
            raise EscortError(why)
    except EscortError as exc:
        app.notify(str(exc), severity="error", markup=False)
        return

    def preflight_done(pf: mig.Preflight | None) -> None:
        if pf is not None:
            confirm_and_start(app, pf)

    app.push_screen(PreflightScreen(vm_key, host), preflight_done)


def decision_text(pf: mig.Preflight) -> str:
    """What the confirmation shows: the decision and exactly what will be pinned."""
    plan = pf.plan
    lines = [f"Live-migrate {pf.vm} from {pf.source} to {pf.target} as {pf.admin}.",
             "Every pre-flight check passed."]
    if plan is not None:
        stream = "one stream" if plan.channels <= 1 else f"{plan.channels} connections (multifd)"
        lines += [f"TLS to {plan.tls_name} (certificate sha256 {plan.cert_fingerprint[:16]}…),",
                  f"{stream} to {plan.migration_uri}; persistent on {pf.target}, undefined on {pf.source}.",
                  f"Grant {plan.grant_id or '-'}; recorded in the audit log before it starts."]
    return "\n".join(lines)


def confirm_and_start(app: EscortApp, pf: mig.Preflight) -> None:
    def confirmed(ok: bool | None) -> None:
        if ok:
            app.run_worker(_start(app, pf), group="migration-start", exit_on_error=False)

    app.push_screen(ConfirmDialog(f"Migrate {pf.vm}?", decision_text(pf), confirm_label="Migrate",
                                  type_to_confirm=pf.vm), confirmed)


async def _start(app: EscortApp, pf: mig.Preflight) -> None:
    try:
        await hub_for(app).start(pf)
    except EscortError as exc:
        app.notify(f"Not started: {exc}", severity="error", markup=False)
        return
    app.notify(f"Migrating {pf.vm} to {pf.target}: progress on the Migrations tab (4).", timeout=5,
               markup=False)
    await app.switch_mode("migrations")


def checklist_lines(pf: mig.Preflight) -> list[str]:
    """Every pre-flight item with ✓/✗/– and its reasons (and fixes), plain text."""
    out: list[str] = []
    for item in pf.items:
        mark = OK if item.status == "ok" else (BAD if item.status == "fail" else "–")
        word = {"ok": "ok", "fail": "FAILED", "skipped": "skipped"}.get(item.status, item.status)
        out.append(f"{mark} {item.title} — {word}")
        if item.detail:
            out.append(f"    {item.detail}")
        for r in item.reasons:
            out.append(f"    • {r.message} [{r.code}]")
            if r.fix:
                out.append(f"      fix: {r.fix}")
    return out


class PreflightScreen(ModalScreen["mig.Preflight | None"]):
    """The checklist. Runs the service's pre-flight in a worker; Cancel has focus."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="preflight.cancel"),
    ]

    DEFAULT_CSS = """
    PreflightScreen { align: center middle; }
    PreflightScreen > Vertical {
        width: 78; max-width: 100%; height: auto; max-height: 100%;
        border: thick $primary; background: $panel; padding: 0 1;
    }
    PreflightScreen #pf-title { text-style: bold; }
    PreflightScreen VerticalScroll { height: auto; max-height: 14; }
    PreflightScreen #pf-verdict { margin-top: 1; text-style: bold; }
    PreflightScreen Horizontal { height: auto; align-horizontal: right; }
    PreflightScreen Button { margin-left: 1; }
    """

    def __init__(self, vm_key: str, host: str) -> None:
        super().__init__()
        self.vm_key = vm_key
        self.host = host
        self.result: mig.Preflight | None = None

    @property
    def escort(self) -> EscortApp:
        from console.ui.app import EscortApp

        return cast(EscortApp, self.app)

    def compose(self) -> ComposeResult:
        vm = self.escort.vm_by_key(self.vm_key)
        name = vm.name if vm is not None else self.vm_key
        with Vertical():
            yield Label(f"Pre-flight: {name} → {self.host}", id="pf-title")
            with VerticalScroll():
                yield Static("Checking: policy, allowed set, grant, the target's certificate, "
                             "reachability, the VM, room on the target…", id="pf-checks", markup=False)
            yield Static("", id="pf-verdict", markup=False)
            with Horizontal():
                yield Button("Cancel", id="cancel", variant="primary")
                yield Button("Migrate…", id="go", variant="error", disabled=True)

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()
        self.run_preflight()

    @work(exclusive=True, group="preflight", exit_on_error=False)
    async def run_preflight(self) -> None:
        """Async worker on the app's loop: the service does libvirt/SSH in its own threads,
        and the fleet service is not thread-safe, so no thread of ours touches it."""
        hub = hub_for(self.escort)
        admins = self.escort.admin_ids()
        if self.escort.admin is None and len(admins) != 1:
            self.query_one("#pf-checks", Static).update(
                f"{BAD} A migration is made by an admin whose grant covers the VM, and this "
                f"console is acting as no admin. ctrl+p → \"Act as admin …\" "
                f"({', '.join(admins) or 'the fleet file lists none'}), then m again.")
            self.query_one("#pf-verdict", Static).update("Nothing was checked or changed.")
            return
        try:
            pf = await hub.service.preflight(self.vm_key, self.host, self.escort.admin)
        except EscortError as exc:
            self.query_one("#pf-checks", Static).update(f"{BAD} {exc}")
            self.query_one("#pf-verdict", Static).update("Pre-flight could not run; nothing was changed.")
            return
        self.result = pf
        self.query_one("#pf-checks", Static).update("\n".join(checklist_lines(pf)))
        verdict = self.query_one("#pf-verdict", Static)
        go = self.query_one("#go", Button)
        if not pf.ok:
            n = len([i for i in pf.items if i.status == "fail"])
            verdict.update(f"{BAD} Refused: {plural(n, 'check')} failed (above). Nothing was changed.")
        elif hub.demo:
            verdict.update(f"{OK} Every check passed (in {pf.elapsed_s:.2f} s).\n{WARN} {NEEDS_REAL_HOSTS}")
        elif self.escort.readonly:
            verdict.update(f"{OK} Every check passed. READ-ONLY: migrating is disabled.")
        else:
            verdict.update(f"{OK} Every check passed in {pf.elapsed_s:.2f} s. Migrate… asks you to confirm.")
            go.disabled = False

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.result if event.button.id == "go" and self.result is not None else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


# ------------------------------------------------------------------ the Migrations tab
class MigrationsScreen(FleetScreen):
    """One live panel per migration; half-done migrations (reconcile) shown first."""

    screen_label = "Migrations"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "abort", "Abort", id="migrations.abort"),
        Binding("s", "scan", "Scan", id="migrations.scan"),
        Binding("f", "resolve", "Fix", id="migrations.resolve"),
        Binding("tab", "app.focus_next", "Next", show=False, id="migrations.next"),
    ]

    DEFAULT_CSS = """
    MigrationsScreen #mig-body { height: 1fr; }
    MigrationsScreen #reconcile { margin-bottom: 1; }
    MigrationsScreen #reconcile.-cases { border: round $warning; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield from self.compose_top()
        with VerticalScroll(id="mig-body"):
            yield Static("", id="reconcile", markup=False)
            yield Static("", id="mig-empty", markup=False)
        yield from self.compose_bottom()

    @property
    def hub(self) -> MigrationHub:
        return hub_for(self.escort)

    def on_mount(self) -> None:
        self._drawn: dict[str, int] = {}
        self._n_running = 0
        self._cases_drawn = -1
        self._tick()
        self.set_interval(0.5, self._tick)
        # the app scans for half-done migrations on start and after every refresh
        # (MigrationHub.after_refresh); this screen shows the latest list, s scans now

    # -- panels ----------------------------------------------------------------------
    def _empty_text(self) -> str:
        hub = self.hub
        why = hub.unavailable()
        if why:
            return f"No migrations: {why}."
        lines = ["No migration started from this console yet.",
                 "On the VMs tab (3): pick a VM, Tab to an allowed target, press m.",
                 "On the Hosts tab (2): e evacuates the selected host."]
        if hub.demo:
            lines += ["", f"{WARN} {NEEDS_REAL_HOSTS}"]
        if self.escort.readonly:
            lines += ["", "READ-ONLY: starting, aborting and fixing migrations are disabled."]
        return "\n".join(lines)

    def _tick(self) -> None:
        """Mount panels for new runs and redraw the ones whose state changed (latest only)."""
        hub = self.hub
        if hub.cases_version != self._cases_drawn:
            self._show_cases()
        body = self.query_one("#mig-body", VerticalScroll)
        empty = self.query_one("#mig-empty", Static)
        empty.display = not hub.runs
        if not hub.runs:
            empty.update(self._empty_text())
        running = sum(1 for r in hub.runs if not r.done)
        if running != self._n_running:
            self._n_running = running
            self.refresh_bindings()  # Abort appears while something runs
        for run in hub.runs:
            panel_id = f"run-{run.id}"
            found = list(self.query(f"#{panel_id}").results(MigrationPanel))
            if not found:
                panel = MigrationPanel(run.id, run.plan.vm_name, run.plan.source, run.plan.target,
                                       id=panel_id)
                body.mount(panel, after=self.query_one("#reconcile"))
                self._drawn[run.id] = -1
                self.call_after_refresh(self._draw, run)
                continue
            if hub.versions.get(run.id, 0) != self._drawn.get(run.id):
                self._draw(run)

    def _draw(self, run: MigrationRun) -> None:
        found = list(self.query(f"#run-{run.id}").results(MigrationPanel))
        if not found or not found[0].is_mounted:
            return
        self._drawn[run.id] = self.hub.versions.get(run.id, 0)
        found[0].show(run.progress, run.result.outcome if run.result is not None else None)

    def _target_panel(self) -> MigrationPanel | None:
        focused = self.focused
        if isinstance(focused, MigrationPanel):
            return focused
        running = [p for p in self.query(MigrationPanel) if not p.finished]
        return running[0] if len(running) == 1 else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Keys show only when they can do something (the footer says what is possible)."""
        if action in ("abort", "resolve") and self.escort.readonly:
            return False
        if action == "abort":
            return any(not r.done for r in self.hub.runs)
        if action == "resolve":
            return any(c.steps for c in self.hub.cases)
        if action == "scan":
            return not self.hub.unavailable()
        return super().check_action(action, parameters)

    def action_abort(self) -> None:
        panel = self._target_panel()
        if panel is None:
            self.notify("Tab to the migration to abort (no single one is running).", timeout=4)
            return
        run = next((r for r in self.hub.runs if r.id == panel.run_id), None)
        if run is None or run.done:
            self.notify(f"{panel.vm}: this migration has already ended.", timeout=4)
            return
        if run.verifying:  # libvirt has returned: nothing to cancel, only a wait to end
            run.stop_waiting("admin")
            self.notify(f"{panel.vm}: stopped waiting; the panel says what is known now.", timeout=5)
            return

        def answered(ok: bool | None) -> None:
            if ok:
                self.run_worker(run.abort("admin"), group="abort", exit_on_error=False)
                self.notify(f"Abort requested for {panel.vm}; the panel says where it runs.", timeout=5)

        self.app.push_screen(ConfirmDialog(
            f"Abort migrating {panel.vm}?",
            f"libvirt cancels the job; {panel.vm} keeps running on {panel.source} "
            "(the console checks and shows it).", confirm_label="Abort migration"), answered)

    # -- reconcile -------------------------------------------------------------------
    def action_scan(self) -> None:
        why = self.hub.unavailable()
        if why:
            self.notify(why, severity="error", markup=False)
            return
        self.scan()

    @work(exclusive=True, group="reconcile", exit_on_error=False)
    async def scan(self) -> None:
        box = self.query_one("#reconcile", Static)
        box.update("Looking on every host for migrations left half-done…")
        try:
            await self.hub.scan()
        except EscortError as exc:
            box.update(f"{BAD} Could not scan for half-done migrations: {exc}")
            return
        self._show_cases()

    def _show_cases(self) -> None:
        box = self.query_one("#reconcile", Static)
        hub = self.hub
        self._cases_drawn = hub.cases_version
        cases = hub.cases
        box.set_class(bool(cases), "-cases")
        if not hub.scanned:
            box.update("")
            box.display = False
            return
        box.display = True
        if not cases:
            box.update(f"{OK} No half-done migration found (no VM paused for migration or on two hosts).")
            self.refresh_bindings()
            return
        lines = [f"{WARN} {plural(len(cases), 'VM')} left half-done by a migration — resolve first:"]
        for n, case in enumerate(cases, 1):
            lines.append(f"{n}. {case.name}: {case.message} [{case.code}]")
            lines += [f"     {c.describe()}" for c in case.copies]
            if case.steps:
                steps = ", then ".join(f"{a} on {h}" for a, h in case.steps)
                lines.append(f"     safe resolution: {steps}" + (" — f applies it" if n == 1 else ""))
            else:
                lines.append(f"     no automatic resolution: {case.advice}")
        box.update("\n".join(lines))
        self.refresh_bindings()  # Fix appears when a case has a safe resolution

    def action_resolve(self) -> None:
        case = next((c for c in self.hub.cases if c.steps), None)
        if case is None:
            self.notify("Nothing to fix automatically (s scans again).", timeout=4)
            return
        steps = ", then ".join(f"{a} on {h}" for a, h in case.steps)

        def answered(ok: bool | None) -> None:
            if ok:
                self._resolve(case)

        self.app.push_screen(ConfirmDialog(
            f"Resolve {case.name}?", f"{case.message}\nSteps: {steps}.\nNever both copies resumed; "
            "audited before anything is done.", confirm_label="Resolve", type_to_confirm=case.name),
            answered)

    @work(group="resolve", exit_on_error=False)
    async def _resolve(self, case: mig.ReconcileCase) -> None:
        try:
            done = await self.hub.service.resolve(case, self.escort.admin)
        except EscortError as exc:
            self.notify(f"{case.name}: {exc}", severity="error", markup=False)
            return
        self.notify(f"{case.name}: {'; '.join(done)}.", timeout=6, markup=False)
        self.scan()

    def copy_text(self) -> str:
        parts = [str(self.query_one("#reconcile", Static).render())] if self.hub.scanned else []
        parts += [p.plain() for p in self.query(MigrationPanel)]
        return "\n\n".join(parts)


__all__ = ["MigrationHub", "MigrationsScreen", "PreflightScreen", "close_hub", "hub_for",
           "request_migration"]
