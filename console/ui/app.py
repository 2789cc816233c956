"""The escort operator console (Textual).

The app owns the fleet service and the derived row lists; screens only read them.
Four modes (Trust, Hosts, VMs, Migrations) each keep their own screen stack, so a
walkthrough pushed from VMs comes back to the same VM with Escape.
"""

from __future__ import annotations

import datetime as dt
import gc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.notifications import SeverityLevel
from textual.screen import Screen
from textual.signal import Signal

from console.core.errors import EscortError
from console.core.inventory import HostView, VMView
from console.ui.commands import EscortCommands
from console.ui.config import DEFAULT_THEME, UIConfig, config_dir
from console.ui.service import FleetLike
from console.ui.text import (
    BAD,
    OK,
    WARN,
    assurance,
    cert_lines,
    expiry_words,
    kind_label,
    plural,
    reach_words,
    reason_lines,
)
from console.ui.themes import load_theme_dirs, shipped_theme_dir
from console.ui.widgets.detail import DetailPane
from console.ui.widgets.vtable import Row, make_row

#: a VM row's tones without a policy problem or misplacement: with allowed targets, with none
_ROW_TONES = ("strong", "", "", "", "")
_ROW_TONES_NONE = ("strong", "", "", "", "bad")


def describe_problem(problem: Any) -> str:
    """A load problem (pki.Problem, Reason, or text) as one line."""
    reason = getattr(problem, "reason", None)
    source = str(getattr(problem, "source", "") or "")
    if reason is not None:
        message = str(reason.message)
        return f"{source}: {message}" if source and source not in message else message
    plain = getattr(problem, "message", None)
    return str(plain) if plain is not None else str(problem)


class EscortApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "escort"
    ENABLE_COMMAND_PALETTE = True
    COMMANDS: ClassVar[set[Any]] = App.COMMANDS | {EscortCommands}

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False, id="app.quit"),
        Binding("ctrl+p", "command_palette", "Palette", priority=True, show=False,
                id="app.palette"),
        Binding("1", "switch_mode('trust')", "Trust", id="app.trust"),
        Binding("2", "switch_mode('hosts')", "Hosts", id="app.hosts"),
        Binding("3", "switch_mode('vms')", "VMs", id="app.vms"),
        Binding("4", "switch_mode('migrations')", "Migr.", id="app.migrations"),
        Binding("question_mark", "help", "Help", key_display="?", id="app.help"),
        Binding("p", "problems", "Problems", show=False, id="app.problems"),
        Binding("C", "copy_error", "Copy error", show=False, id="app.copy_error"),
        Binding("r", "refresh", "Refresh", show=False, id="app.refresh"),
        Binding("R", "radar", "Radar", show=False, id="app.radar"),
    ]

    def __init__(self, service: FleetLike, *, config: UIConfig | None = None,
                 at: dt.datetime | None = None, admin: str | None = None,
                 problems: Iterable[str] = (), start_mode: str = "vms",
                 user_theme_dir: Path | None = None, live: bool = True) -> None:
        super().__init__()
        self.service = service
        self.config = config or UIConfig()
        self.at = at or getattr(service, "at", None) or dt.datetime.now(dt.UTC)
        self.admin = admin
        self.readonly = bool(service.readonly or self.config.readonly)
        self._extra_problems = list(problems)
        self._start_mode = start_mode
        self._user_theme_dir = user_theme_dir if user_theme_dir is not None else config_dir() / "themes"
        self.last_error = ""
        self._hosts: list[HostView] = []
        self._vms: list[VMView] = []
        self._vm_index: dict[str, VMView] = {}
        self._host_index: dict[str, HostView] = {}
        self._host_rows: list[Row] = []
        self._vm_rows: list[Row] = []
        self._vms_on_host: dict[str, int] = {}
        #: VM UUID -> services.check.Placement: VMs running where their policy refuses them
        self.misplaced: dict[str, Any] = {}
        #: host name -> services.guard.GuardState, after the first live refresh
        self.guard_states: dict[str, Any] = {}
        self.live = live
        #: admin id -> why their key is missing ("" = present); None until the keys were looked at
        self.admin_keys: dict[str, str] | None = None
        #: emergencies declared for hosts (services/emergency.py), shown in the title until they end
        self.emergencies: dict[str, Any] = {}
        self._inventory: Any = None
        self.refreshing = False
        #: published after a refresh changed the views; screens re-read their rows
        self.fleet_changed: Signal[None] = Signal(self, "fleet-changed")
        #: published while the start-up check streams verdicts in: the VM keys now decided
        self.verdicts_arrived: Signal[frozenset[str]] = Signal(self, "verdicts-arrived")
        #: a lazy service is checked in steps after the first paint: rows first ("checking…"),
        #: verdicts as they are decided (services/fleet.py ``check_in_steps``)
        self.progressive = (callable(getattr(service, "check_in_steps", None))
                            and not getattr(service, "eager", True))
        self.checking = False
        #: the running start-up check's generator (closed when it ends or the console quits)
        self._check_steps: Any = None
        #: the start-up check's progress, shown in the title bar ("checking 3,412 of 10,000 VMs"):
        #: VMs whose verdict is on their row / VMs in the fleet; "" or why the check stopped
        self.check_decided = 0
        self.check_total = 0
        self.check_failed = ""
        if self.progressive:
            self._load_stub_views()
        else:
            self.load_views()
        if self.config.keymap:
            self.set_keymap(self.config.keymap)

    # ------------------------------------------------------------ modes
    def _mode_factories(self) -> dict[str, Callable[[], Screen[Any]]]:
        from console.ui.screens.hosts import HostsScreen
        from console.ui.screens.migrations import MigrationsScreen
        from console.ui.screens.trust import TrustScreen
        from console.ui.screens.vms import VMsScreen

        return {"trust": TrustScreen, "hosts": HostsScreen, "vms": VMsScreen,
                "migrations": MigrationsScreen}

    def on_mount(self) -> None:
        for mode, factory in self._mode_factories().items():
            self.add_mode(mode, factory)
        self.title = f"escort — {self.service.name}" if self.service.name else "escort"
        self.sub_title = (kind_label(self.service.kind) + (" · READ-ONLY" if self.readonly else "")
                          + ("" if self.live else " · offline"))
        self._load_themes()
        self.switch_mode(self._start_mode)
        if self.progressive:
            self.call_after_refresh(self.start_checking)  # after the first paint
        if self.live:
            self.action_refresh()
            self.run_worker(self._survey_admin_keys(), group="admin-keys", exit_on_error=False)

    async def _survey_admin_keys(self) -> None:
        """Which admins' keys the operator holds (agent, identity files): "Act as" offers only those."""
        if getattr(self.service, "spec", None) is None:
            return
        from console.services.identity import AdminIdentity, default_identity

        try:
            ident: AdminIdentity = default_identity(self.service)  # type: ignore[arg-type]
            ident.passphrase = None  # never prompt under the console
            avail = await ident.available()
        except Exception as exc:  # a broken agent must not take the console down
            self.admin_keys = {a: f"keys could not be checked ({exc})" for a in self.admin_ids()}
            return
        self.admin_keys = {**{a: "" for a in avail.present},
                           **{a: r.message for a, r in avail.missing.items()}}
        self._read_emergencies()

    def _read_emergencies(self) -> None:
        """Declared emergencies in force (signed, from the audit log); retitle when they change."""
        if getattr(self.service, "spec", None) is None:
            return
        from console.services.emergency import audit_path, declared

        try:
            found = declared(self.service, audit_path(self.service))  # type: ignore[arg-type]
        except Exception:  # an unreadable log must not take the console down
            return
        if set(found) != set(self.emergencies):
            self.emergencies = found
            self.retitle()  # retitle only: rows and focus stay as they are (a dialog may be open)

    # ---------------------------------------------------------- start-up check
    def _load_stub_views(self) -> None:
        """Rows from what the fleet names, nothing checked yet: every verdict "checking…"."""
        service: Any = self.service
        self.checking = True
        self._set_views(list(service.host_stubs()), list(service.vm_stubs()))
        self.check_decided, self.check_total, self.check_failed = 0, len(self._vms), ""

    @property
    def verdicts_pending(self) -> bool:
        """True while some VM's row still waits for its verdict (the title bar says how many).
        False once every row has one, which can be before ``checking`` ends: the check's
        bookkeeping (policy memory, cache files) and the placement marks follow it."""
        return self.checking and (self.check_decided < self.check_total or not self.check_total)

    def check_words(self) -> str:
        """The title bar's progress of the start-up check ("" when there is none to show)."""
        if self.check_failed:
            return f"check FAILED at {self.check_decided:,} of {self.check_total:,} VMs"
        if not self.checking and self.check_decided < self.check_total:
            return f"only {self.check_decided:,} of {self.check_total:,} VMs checked"  # never "done"
        if not self.verdicts_pending:
            return ""
        if not self.check_total:
            return "checking…"
        return f"checking {self.check_decided:,} of {self.check_total:,} VMs"

    def retitle(self) -> None:
        """Redraw the title bars of the screens in view (one line each; no relayout), each
        after what its screen has queued (rows the title's count must not run ahead of)."""
        from console.ui.screens.base import FleetScreen

        for screen in self.screen_stack:
            if isinstance(screen, FleetScreen):
                screen.call_next(screen.retitle)

    def start_checking(self) -> None:
        """Check the fleet in small steps on the event loop; rows get their verdicts as
        they are decided. A newer check (after a refresh) replaces a running one."""
        if not self.progressive:
            return
        self.checking = True
        self.run_worker(self._check_fleet(), exclusive=True, group="check", exit_on_error=False)

    async def _check_fleet(self) -> None:
        import asyncio
        import time

        service: Any = self.service
        problems_before = len(self.all_problems())
        position = {v.uuid: i for i, v in enumerate(self._vms)}
        n_hosts = len(self._hosts)
        arrived: set[str] = set()
        decided: set[str] = set()  # rows with their verdict (a VM yielded twice counts once)
        published = 0
        last = time.perf_counter()
        steps = self._check_steps = iter(service.check_in_steps())
        try:
            for views in steps:
                for view in views:
                    i = position.get(view.uuid)
                    if i is None:
                        continue
                    self._vms[i] = view
                    self._vm_index[view.uuid] = view
                    self._vm_rows[i] = self._vm_row(view, n_hosts)
                    arrived.add(view.uuid)
                    decided.add(view.uuid)
                if len(decided) >= len(position) and getattr(service, "verdicts_final", False):
                    break  # every verdict is in: the check's bookkeeping waits until after the end
                # the first verdicts at once (they are the rows on screen when the fleet reuses its
                # snapshot: services/fleet.py yields those first), then at most 4 times a second
                if arrived and (not published or time.perf_counter() - last > 0.25
                                or len(decided) >= len(position)):
                    # the title's count (screens retitle on this signal, after taking its rows):
                    # only rows handed to the screens; it leaves the title with the last of them
                    self.check_decided = len(decided)
                    self.verdicts_arrived.publish(frozenset(arrived))
                    published += 1
                    arrived = set()
                    last = time.perf_counter()
                    if published == 1 or len(decided) >= len(position):
                        # let the screen show them before more work (the rest of the rows, the
                        # placement check) runs on this loop: sleep(0) alone is not enough when
                        # the screen awaits something of its own (e.g. the footer recomposing
                        # after the first focus: its widgets mount over many loop turns, each
                        # taking a step of this check too)
                        await self._screen_refreshed()
                await asyncio.sleep(0)
            self.check_decided = len(decided)  # (screens retitle on the signals below)
            if arrived:  # the last verdicts (a small fleet may be decided within one 0.25 s step)
                self.verdicts_arrived.publish(frozenset(arrived))
                await self._screen_refreshed()
            # the streamed views are final; hosts now carry their checked chains (cached). The
            # placement check (full decisions of the VMs away from home) runs in steps first,
            # still as part of the check (a refresh meanwhile replaces this check as it would
            # any step)
            placed = await self._misplaced_in_steps()
            self.checking = False
            self._set_views(list(self.service.hosts()), self._vms, vm_rows=self._vm_rows, misplaced=placed)
            self.fleet_changed.publish(None)
            self._check_notices(problems_before)
            # the check's bookkeeping (policy memory, opened cache, the fleet snapshot), in steps
            # after the end: services/fleet.py ``_after_check``
            shown = (getattr(service, "cache_notice", ""), len(self.all_problems()))
            for _ in steps:
                await asyncio.sleep(0)
            if (getattr(service, "cache_notice", ""), len(self.all_problems())) != shown:
                self._check_notices(shown[1], shown[0])
        except EscortError as exc:
            if self.checking:
                self.check_failed = str(exc)
                self.retitle()
            self.notify(f"Checking the fleet failed: {exc}", severity="error", markup=False)
            return
        finally:
            # ended, failed or cancelled (a refresh replaces this check): the check's generator
            # is closed here and now, not whenever it is freed -- it holds the cyclic garbage
            # collector off while it runs (services/fleet.py ``check_in_steps``)
            self._close_check(steps)

    def _close_check(self, steps: Any = None) -> None:
        """Close the start-up check's generator (``steps``, or the running one's); once."""
        if steps is None or steps is self._check_steps:
            steps, self._check_steps = self._check_steps, None
        close = getattr(steps, "close", None)
        if close is not None:
            close()
            # the check's end hands its heap back to the collector (``gc.unfreeze``), also what
            # ``_set_views`` froze when its verdicts were in: frozen again, as there (a full
            # pass over the views and rows was ~0.25 s here at 10,000 VMs)
            gc.freeze()

    def _check_notices(self, problems_before: int, shown_notice: str = "") -> None:
        """After the start-up check: the cache's notice (once) and the problems it found."""
        notice = getattr(self.service, "cache_notice", "")
        if notice and notice != shown_notice:
            self.notify(notice, severity="warning", markup=False, timeout=8)
        problems = self.all_problems()
        if len(problems) > problems_before:
            self.notify(f"{plural(len(problems), 'problem')} loading this fleet: {problems[0]} — press p",
                        severity="warning", markup=False, timeout=8)

    async def _screen_refreshed(self, timeout: float = 0.5) -> None:
        """Until the current screen has processed what it has queued (at most ``timeout``: a
        screen that is closing or busy must not stall the check)."""
        import asyncio
        import contextlib

        with contextlib.suppress(TimeoutError, AssertionError):
            await asyncio.wait_for(self.screen.wait_for_refresh(), timeout)

    # ---------------------------------------------------------- refresh
    def action_refresh(self) -> None:
        """Ask every host what it runs now (libvirt; the demo's test:// driver too)."""
        spec = getattr(self.service, "spec", None)
        if spec is None or not hasattr(self.service, "apply_facts"):
            return
        if not self.live:
            self.notify("Offline: no host is contacted; decisions come from the fleet file and "
                        "local certificates.", timeout=4, markup=False)
            return
        if self.refreshing:
            self.notify("A refresh is already running.", timeout=3)
            return
        self.refreshing = True
        self.run_worker(self._refresh(), exclusive=True, group="refresh", exit_on_error=False)

    async def _refresh(self) -> None:
        try:
            results = await self.inventory_service().refresh()
        except EscortError as exc:
            self.notify(f"Refresh failed: {exc}", severity="error", markup=False)
            return
        finally:
            self.refreshing = False
        down = [name for name, r in results.items() if r.facts is None]
        self._read_emergencies()
        if self.progressive:
            self._load_stub_views()  # facts changed: every verdict is re-decided, none kept stale
            self.fleet_changed.publish(None)
            self.start_checking()
        else:
            self.load_views()
            self.fleet_changed.publish(None)
        from console.ui.screens.migrations import hub_for

        hub_for(self).after_refresh()  # migrations left half-done: on start, after every refresh
        self.run_worker(self._guard_status(), exclusive=True, group="guard", exit_on_error=False)
        if down:
            self.notify(f"{plural(len(down), 'host')} did not answer: {', '.join(sorted(down)[:5])}",
                        severity="warning", markup=False)

    async def _guard_status(self) -> None:
        """Each host's guard (version, trust digest) for the Hosts screen and Problems."""
        from console.services.guard import GuardService

        if getattr(self.service, "spec", None) is None:
            return
        try:
            states = await GuardService(self.service, self.inventory_service()).status()  # type: ignore[arg-type]
        except Exception as exc:  # the console stays up; the Hosts screen shows "?"
            self.notify(f"Guard status could not be read: {exc}", severity="warning", markup=False)
            return
        self.guard_states = {st.host: st for st in states}
        if self.progressive:  # only the hosts' guard column changed; verdicts are being checked
            self._host_rows = [self._host_row(h) for h in self._hosts]
        else:
            self.load_views()
        self.fleet_changed.publish(None)
        missing = sorted(st.host for st in states if st.state in ("missing", "broken"))
        if missing:
            self.notify(f"No working escort guard on {', '.join(missing[:5])}: plain virsh can move VMs "
                        "there regardless of policies (see Problems).", severity="warning", markup=False)

    def inventory_service(self) -> Any:
        """The one InventoryService (SSH pool, libvirt connections) refresh and migrations share."""
        from console.services.inventory import InventoryService

        if self._inventory is None:
            self._inventory = InventoryService.for_fleet(self.service)  # type: ignore[arg-type]
        return self._inventory

    async def on_unmount(self) -> None:
        from console.ui.screens.migrations import close_hub

        self._close_check()  # (quitting mid-check: its worker may never run again to close it)

        await close_hub(self)  # aborts migrations still running, closes the audit log
        if self._inventory is not None:
            await self._inventory.close()

    def title_line(self, screen: str) -> str:
        """The top line: read-only first (never cut off), where we are, which fleet and
        what kind it is (demo/lab/real)."""
        parts = ["escort"] + (["READ-ONLY"] if self.readonly else []) + ([screen] if screen else [])
        progress = self.check_words()  # before the fleet's name: visible at 80 columns
        if progress:
            parts.append(progress)
        if self.admin:
            parts.append(f"as {self.admin}")
        now = dt.datetime.now(dt.UTC)
        for em in self.emergencies.values():
            if em.active(now):
                parts.append(f"EMERGENCY {em.host} until {em.end:%H:%M} UTC")
        name = self.service.name
        if name:
            label = kind_label(self.service.kind)
            where = label if name == self.service.kind else f"{name}: {label}"
            if not self.live:
                where = f"offline │ {where}"
        else:
            where = "no fleet loaded (press p)"
        return " │ ".join([*parts, where])

    # ----------------------------------------------------------- themes
    def _load_themes(self) -> None:
        themes, failures = load_theme_dirs([shipped_theme_dir(), self._user_theme_dir])
        for theme in themes:
            self.register_theme(theme)
        if failures:
            self.notify("Theme file(s) not loaded, using the default: " + "; ".join(failures),
                        severity="warning", timeout=10, markup=False)
        wanted = self.config.theme or DEFAULT_THEME
        if wanted in self.available_themes:
            self.theme = wanted
        else:
            if wanted != DEFAULT_THEME:
                self.notify(f"Theme {wanted!r} not found (config file); using {DEFAULT_THEME}.",
                            severity="warning", timeout=10, markup=False)
            if DEFAULT_THEME in self.available_themes:
                self.theme = DEFAULT_THEME

    def tones(self) -> dict[str, str]:
        """Rich styles for tones (ok/bad/warn/dim/strong) in the current theme."""
        v = self.theme_variables
        return {
            "ok": v.get("success", "green"),
            "bad": v.get("error", "red"),
            "warn": v.get("warning", "yellow"),
            "dim": "dim",
            "strong": "bold",
            "": "",
        }

    # ------------------------------------------------------------ views
    def load_views(self) -> None:
        """Read the service's views once and precompute every table row (and its filter
        text), so screens and filters never walk the fleet again."""
        self._set_views(list(self.service.hosts()), list(self.service.vms()))

    def _set_views(self, hosts: list[HostView], vms: list[VMView], vm_rows: list[Row] | None = None,
                   misplaced: dict[str, Any] | None = None) -> None:
        """``vm_rows``: rows already built for exactly these ``vms`` (the streamed start-up
        check); only those the placement check marks are built again. ``misplaced``: the
        placement check of exactly these views, already made (``_misplaced_in_steps``)."""
        before = self.misplaced
        self._hosts = hosts
        self._vms = vms
        self._host_index = {h.name: h for h in self._hosts}
        self._vm_index = {v.uuid: v for v in self._vms}
        counts: dict[str, int] = {}
        for vm in self._vms:
            counts[vm.host] = counts.get(vm.host, 0) + 1
        self._vms_on_host = counts
        # the placement check needs every verdict: after the start-up check, not before
        self.misplaced = misplaced if misplaced is not None else self._find_misplaced()
        self._host_rows = [self._host_row(h) for h in self._hosts]
        n_hosts = len(self._hosts)
        if vm_rows is not None and len(vm_rows) == len(self._vms):
            marked = set(before) | set(self.misplaced)
            self._vm_rows = [self._vm_row(v, n_hosts) if v.uuid in marked else row
                             for v, row in zip(self._vms, vm_rows, strict=True)]
        else:
            self._vm_rows = [self._vm_row(v, n_hosts) for v in self._vms]
        # Views and rows live as long as the console: keep the cyclic GC from walking
        # millions of them on every collection (measured: 100-300 ms pauses mid-typing
        # with 10,000 VMs). Frozen objects are still freed by reference counting.
        gc.freeze()

    def _placement_checkable(self) -> bool:
        """False for a test double without the full service (no placement check then)."""
        return hasattr(self.service, "matrix") and hasattr(self.service, "policy_token")

    async def _misplaced_in_steps(self) -> dict[str, Any]:
        """``_find_misplaced`` for the current views in ~5 ms steps on the event loop (keys are
        answered between them)."""
        import asyncio

        from console.services.check import misplaced_in_steps

        if not self._placement_checkable():
            return {}
        steps = misplaced_in_steps(self.service, vms=self._vms)  # type: ignore[arg-type]
        try:
            while True:
                next(steps)
                await asyncio.sleep(0)
        except StopIteration as done:
            return {p.uuid: p for p in done.value}
        except EscortError:
            return {}

    def _find_misplaced(self) -> dict[str, Any]:
        """VMs on a host their policy refuses (one shared placement check, services/check.py)."""
        from console.services.check import misplaced

        if not self._placement_checkable():
            return {}
        if self.checking:
            return {}  # start-up rows ("checking…"): decided once the streamed check is done
        try:
            return {p.uuid: p for p in misplaced(self.service, vms=self._vms)}  # type: ignore[arg-type]
        except EscortError:
            return {}

    def guard_words(self, host: str) -> tuple[str, str]:
        """(cell text, tone) for a host's guard: glyph + word, never colour alone."""
        st = self.guard_states.get(host)
        if st is None:
            return "·", "dim"
        return {"current": (f"{OK} on", "ok"), "stale": (f"{WARN} old", "warn"),
                "missing": (f"{BAD} none", "bad"), "broken": (f"{BAD} bad", "bad"),
                "unreachable": ("? n/a", "dim"), "not-live": ("—", "dim")}.get(st.state, ("?", "dim"))

    def _host_row(self, host: HostView) -> Row:
        attrs = host.attributes
        if host.cert_problem is not None and attrs is None:
            expiry, expiry_tone = f"{BAD} {host.cert_problem.code}", "bad"
        elif attrs is not None:
            expiry, expiry_tone = expiry_words(attrs.not_after, self.at)
            if host.chain is not None and not host.chain.valid and expiry_tone != "bad":
                first = host.chain.reasons[0].code if host.chain.reasons else "chain"
                expiry, expiry_tone = f"{BAD} {first}", "bad"
        else:
            expiry, expiry_tone = "?", "dim"
        reach, reach_tone = reach_words(host)
        guard, guard_tone = self.guard_words(host.name)
        return make_row(
            host.name,
            [host.name, host.spec.region, (attrs.country or "") if attrs else "", assurance(host),
             expiry, reach, str(self._vms_on_host.get(host.name, 0)), guard],
            ["strong", "", "", "", expiry_tone, reach_tone, "", guard_tone],
        )

    def _vm_row(self, vm: VMView, n_hosts: int) -> Row:
        if vm.checking:
            owner = vm.owner.split(" <", 1)[0]
            return make_row(vm.uuid, [vm.name, owner, vm.host or "?", "checking…", "checking…"],
                            ["strong", "", "", "dim", "dim"])
        owner = vm.owner.split(" <", 1)[0]  # "alice <alice@example>" -> "alice"
        n = len(vm.allowed_targets)
        if not vm.policy_problems and not self.misplaced:
            # the common row (10,000 of them stream in during the start-up check): the same
            # cells and tones as below, built without the general path's lists and copies
            cells = (vm.name, owner, vm.host or "?", vm.policy_summary or "—", f"{n}/{n_hosts}")
            return Row(vm.uuid, cells, _ROW_TONES if n else _ROW_TONES_NONE, " ".join(cells).lower())
        if vm.policy_problems:
            summary, tone = f"{BAD} {vm.policy_problems[0].message}", "bad"
        else:
            summary, tone = vm.policy_summary or "—", ""
        targets = f"{n}/{n_hosts}" if not vm.policy_problems else f"{BAD} 0"
        host, host_tone = vm.host or "?", ""
        bad_place = self.misplaced.get(vm.uuid)
        if bad_place is not None and not bad_place.unchecked:
            # loud, and not by colour alone: a glyph on the host and the words in the policy cell
            host, host_tone = f"{BAD} {vm.host}", "bad"
            codes = ", ".join(r.code for r in bad_place.reasons)
            summary, tone = f"{BAD} MISPLACED: {codes}", "bad"
        return make_row(vm.uuid, [vm.name, owner, host, summary, targets],
                        ["strong", "", host_tone, tone, "bad" if n == 0 else ""])

    def agree_vm_targets(self, key: str, allowed: int, total: int) -> Row | None:
        """The targets pane just decided every host for VM ``key``: make its row say the
        same (a refresh may have changed facts since the rows were built). Returns the new
        row when it changed."""
        for i, row in enumerate(self._vm_rows):
            if row.key == key:
                text = f"{allowed}/{total}"
                if row.cells[4] == text or row.cells[4].startswith(BAD):
                    return None
                cells = (*row.cells[:4], text, *row.cells[5:])
                tones = (*row.tones[:4], "bad" if allowed == 0 else "", *row.tones[5:])
                self._vm_rows[i] = make_row(key, cells, tones)
                return self._vm_rows[i]
        return None

    def host_rows(self) -> list[Row]:
        return self._host_rows

    def vm_rows(self) -> list[Row]:
        return self._vm_rows

    def vm_by_key(self, key: str) -> VMView | None:
        return self._vm_index.get(key)

    def host_by_name(self, name: str) -> HostView | None:
        return self._host_index.get(name)

    def all_vms(self) -> list[VMView]:
        return self._vms

    def all_hosts(self) -> list[HostView]:
        return self._hosts

    def all_problems(self) -> list[str]:
        return [describe_problem(p) for p in self.service.problems] + self._extra_problems

    def policy_names(self) -> dict[str, str]:
        """The fleet's friendly names for certificate policy OIDs (plus escort's defaults)."""
        return dict(getattr(self.service, "policy_names", {}) or {})

    def display_path(self, path: str) -> str:
        """Paths inside the fleet's folder relative to it (what the fleet file says),
        others as they are: shorter at 80 columns and the same on every machine."""
        spec = getattr(self.service, "spec", None)
        base = str(getattr(spec, "base_dir", "") or "")
        if base and path.startswith(base.rstrip("/") + "/"):
            return path[len(base.rstrip("/")) + 1:]
        return path

    def show_host_detail(self, pane: DetailPane, name: str) -> None:
        """The Hosts detail (also used for host leaves in the Trust tree)."""
        host = self._host_index.get(name)
        if host is None:
            pane.show(f"Unknown host {name!r}.")
            return
        spec = host.spec
        reach, _ = reach_words(host)
        lines = [f"{host.name}   region {spec.region or '—'}   {reach}"]
        if host.problem is not None:
            lines += reason_lines([host.problem])
        uri = spec.libvirt_uri
        if uri.startswith("test://"):
            uri = f"libvirt test driver, {self.display_path(uri.removeprefix('test://'))}"
        lines.append(f"libvirt      {uri}" + (f" via ssh {spec.ssh}" if spec.ssh else ""))
        if spec.cert_file:
            lines.append(f"Certificate  {self.display_path(spec.cert_file)}")
        lines.append(f"VMs here     {self._vms_on_host.get(host.name, 0)}")
        st = self.guard_states.get(host.name)
        if st is None:
            state = "not checked yet (refresh)" if self.live else "not checked (offline)"
            lines.append(f"Guard        {state}")
        else:
            word, _ = self.guard_words(host.name)
            text = f"Guard        {word} ({st.state})"
            if st.version:
                text += f", version {st.version}, trust sha256:{st.trust_digest[:16]}"
            lines.append(text)
            if st.problem:
                lines.append(f"             {st.problem}")
        if host.cert_problem is not None:
            lines += ["", "Certificate problem:", *reason_lines([host.cert_problem])]
        attrs = host.attributes
        if attrs is not None:
            lines += ["", "Attributes (from the certificate):",
                      f"  country {attrs.country or '—'}  state {attrs.state or '—'}  "
                      f"site {attrs.locality or '—'}",
                      f"  org {attrs.organization or '—'}  unit {attrs.org_unit or '—'}",
                      f"  policies {', '.join(sorted(attrs.policies)) or 'none'}",
                      f"  names {', '.join(attrs.dns_names + attrs.ips) or '—'}"]
        chain = host.chain
        if chain is not None:
            verdict = "✓ chain valid" if chain.valid else f"{BAD} chain invalid"
            lines += ["", f"Chain: {verdict}"]
            for depth, info in enumerate(chain.chain):
                role = "host" if depth == 0 else ("anchor" if depth == len(chain.chain) - 1 else "CA")
                lines.append(f"  {'  ' * depth}└ {role}: {info.name}  "
                             f"(until {info.not_after:%Y-%m-%d}, {info.fingerprint[:16]}…)")
            lines += reason_lines(chain.reasons) + reason_lines(chain.warnings)
            if chain.leaf is not None:
                leaf = cert_lines(chain.leaf, self.at, self.policy_names())
                lines += ["", "Host certificate:", *("  " + ln for ln in leaf)]
        pane.show("\n".join(lines))

    # ---------------------------------------------------------- actions
    def action_help(self) -> None:
        from console.ui.screens.misc import HelpScreen

        self.push_screen(HelpScreen(self.help_text()))

    def help_text(self) -> str:
        """Keys as currently bound (after the keymap), grouped by where they work."""
        where = str(config_dir() / "config.toml").replace(str(Path.home()), "~", 1)
        lines = [f"escort — keys (remap them by id in {where}, [keymap])", ""]
        seen: set[tuple[str, str]] = set()
        for key, active in sorted(self.screen.active_bindings.items()):
            b = active.binding
            label = b.description or b.action
            if (key, label) in seen or b.system or not b.id:
                continue  # Textual's own scrolling keys have no id and are not ours to remap
            seen.add((key, label))
            lines.append(f"  {b.key_display or self.get_key_display(b):<10} {label:<14} [{b.id or '-'}]")
        lines += [
            "",
            "  In tables: ↑ ↓ PgUp PgDn Home End move, Enter opens, Tab switches pane.",
            "  /  filters the table as you type; Enter keeps the filter; Escape clears it.",
            "  Escape goes back: filter → table → previous screen.",
            "  ctrl+p: every action, \"go to VM …\", \"go to host …\", themes;",
            "          \"why VM HOST\" + Enter: why (not) that VM on that host, step by step.",
            "  R: radar (what expires when, and what breaks then).",
            "  c copies the detail pane (OSC 52 — works over SSH); C copies the last error.",
            "",
            "Glyphs: ✓ valid/allowed  ⚠ expiring/warning  ✗ expired/refused  ⊘ revoked  ? unknown",
        ]
        if self.readonly:
            lines += ["", "READ-ONLY: every action that changes something is disabled."]
        return "\n".join(lines)

    def action_radar(self) -> None:
        from console.ui.screens.radar import RadarScreen

        self.push_screen(RadarScreen())

    def open_why(self, vm_key: str, host: str) -> None:
        """"Why can't VM X go to host Y?": the walkthrough of that pair."""
        self.open_walkthrough(vm_key, host)

    def action_problems(self) -> None:
        from console.ui.screens.misc import ProblemsScreen

        self.push_screen(ProblemsScreen())

    def action_copy_error(self) -> None:
        if not self.last_error:
            self.notify("No error to copy.", timeout=3)
            return
        self.copy_to_clipboard(self.last_error)
        self.notify("Copied the last error to the clipboard (OSC 52).", timeout=3)

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = True) -> None:
        """Remember errors and warnings so ``C`` can copy them later."""
        if severity in ("error", "warning"):
            self.last_error = message
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def open_walkthrough(self, vm_key: str, host: str) -> None:
        from console.ui.screens.walkthrough import WalkthroughScreen

        try:
            self.push_screen(WalkthroughScreen(vm_key, host))
        except EscortError as exc:
            self.notify(str(exc), severity="error", markup=False)

    async def go_to_vm(self, key: str) -> None:
        from console.ui.screens.vms import VMsScreen

        await self.switch_mode("vms")
        screen = self.screen
        if isinstance(screen, VMsScreen):
            screen.focus_vm(key)

    async def go_to_host(self, name: str) -> None:
        from console.ui.screens.hosts import HostsScreen

        await self.switch_mode("hosts")
        screen = self.screen
        if isinstance(screen, HostsScreen):
            screen.focus_host(name)

    def admin_ids(self) -> list[str]:
        """Admins the fleet file names (whose grants decide what they may move)."""
        return [a.id for a in getattr(self.service, "admins", ())]

    def act_as(self, admin: str | None) -> None:
        """Judge targets and walkthroughs for ``admin`` (their grants count) or, with
        None, on the owners' policies alone. Only an admin whose key the operator holds."""
        why = (self.admin_keys or {}).get(admin or "", "")
        if admin and why:
            self.notify(f"Cannot act as {admin}: {why}", severity="warning", timeout=8, markup=False)
            return
        self.admin = admin
        self.fleet_changed.publish(None)  # screens re-read rows and retitle themselves
        who = f"admin {admin}: their grants now count" if admin else "no admin: owners' policies only"
        self.notify(f"Deciding as {who}.", timeout=4, markup=False)

    def request_migration(self, vm_key: str, host: str) -> None:
        """Pre-flight checklist, confirmation, start (console/ui/screens/migrations.py).
        The service enforces read-only even if the UI let it through."""
        from console.ui.screens.migrations import request_migration

        request_migration(self, vm_key, host)

    def request_evacuation(self, hosts: list[str]) -> None:
        """Plan, edit, confirm and run an evacuation of ``hosts`` (screens/evacuation.py)."""
        from console.ui.screens.evacuation import open_evacuation

        open_evacuation(self, hosts)
