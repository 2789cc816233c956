"""What every fleet screen shares: header, problem bar, filter, footer, copy, back."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.dom import NoScreen
from textual.screen import Screen
from textual.widgets import Footer, Input, Static

from console.ui.text import WARN, plural
from console.ui.widgets.detail import DetailPane
from console.ui.widgets.vtable import VirtualTable

if TYPE_CHECKING:
    from console.ui.app import EscortApp


class EscortFooter(Footer):
    """Textual's footer, recomposed once per burst of binding changes, and only when the
    keys it shows changed.

    Textual's own footer queues a full recompose (remove and mount every key, in a batch
    update that holds back the screen's output, then a layout) for *each* binding change —
    focus, mode, screen stack: about seven at the console's start — and the screen handles
    nothing else until each one is done. One pending recompose at a time covers them all,
    and one that would mount exactly the keys already shown is skipped (at the console's
    start that one fell in the fleet check's first second, on the same core)."""

    _recompose_queued = False
    _shown: tuple[object, ...] | None = None  # what the keys on screen were composed from

    def bindings_changed(self, screen: Screen[object]) -> None:
        self._bindings_ready = True
        if not screen.app.app_focus:
            return
        if self.is_attached and screen is self.screen and not self._recompose_queued:
            self._recompose_queued = True
            self.call_after_refresh(self._queued_recompose)

    def shown_keys(self) -> tuple[object, ...]:
        """Everything ``Footer.compose`` builds its keys from: each binding it shows (the
        binding itself, enabled, tooltip, how its key is displayed), the palette's binding
        and whether it is shown. Equal means the same keys would be mounted again."""
        if not self._bindings_ready:
            return ()
        app = self.app
        active = self.screen.active_bindings
        shown = tuple((binding, enabled, tooltip, app.get_key_display(binding))
                      for _, binding, enabled, tooltip in active.values() if binding.show)
        palette = active.get(app.COMMAND_PALETTE_BINDING)
        return (shown, self.show_command_palette, app.ENABLE_COMMAND_PALETTE,
                None if palette is None else (*palette[1:], app.get_key_display(palette[1])))

    async def _queued_recompose(self) -> None:
        self._recompose_queued = False
        if not self.is_attached:
            return  # its screen went away before the queued recompose ran: nothing to show
        try:
            keys = self.shown_keys()
        except NoScreen:
            return  # detached between the check and the query
        if keys == self._shown:
            return  # the same keys, enabled and shown the same way: nothing to mount again
        self._shown = keys
        await self.recompose()


class FleetScreen(Screen[None]):
    """Base: ``/`` filters the screen's main table as you type, ``escape`` backs out."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter", key_display="/", id="screen.filter"),
        Binding("escape", "back", "Back", show=False, id="screen.back"),
        Binding("c", "copy", "Copy", show=False, id="screen.copy"),
    ]

    screen_label: ClassVar[str] = ""
    #: screens with a filterable table set this (decides whether "/" shows in the footer)
    has_filter: ClassVar[bool] = False
    _filtering: VirtualTable | None = None

    @property
    def escort(self) -> EscortApp:
        from console.ui.app import EscortApp

        return cast(EscortApp, self.app)

    def compose_top(self) -> ComposeResult:
        yield Static(self.escort.title_line(self.screen_label), classes="title-bar", markup=False)
        problems = self.escort.all_problems()
        if problems:
            yield Static(
                f"{WARN} {plural(len(problems), 'problem')} loading this fleet: "
                f"{problems[0]} — press p for all",
                classes="problem-bar", markup=False,
            )

    def compose_bottom(self) -> ComposeResult:
        yield EscortFooter(compact=True, show_command_palette=True)

    def on_mount(self) -> None:
        self.escort.fleet_changed.subscribe(self, self._fleet_changed)
        # the title's "checking N of M VMs": retitled by the same signal that hands the screens
        # the new verdicts, posted after them (a subclass's on_mount subscribes first; the
        # rows are the app's rows then, never fewer than its count), so the count never runs
        # ahead of the rows drawn. (Not on screen resume: it would read the app's count before
        # the screen has taken the rows still queued for it.)
        self.escort.verdicts_arrived.subscribe(self, self._verdicts_counted)

    def _fleet_changed(self, _: None) -> None:
        self.reload()  # first: the title's count must not run ahead of the rows the screen shows
        self.retitle()

    def _verdicts_counted(self, _: frozenset[str]) -> None:
        self.retitle()

    def retitle(self) -> None:
        for bar in self.query(".title-bar").results(Static):
            bar.update(self.escort.title_line(self.screen_label), layout=False)

    def reload(self) -> None:
        """Re-read rows and details after a refresh (screens that show fleet data override)."""

    def on_resize(self) -> None:
        """Stack panes on narrow terminals, split them side by side on wide ones."""
        width = self.app.size.width
        self.set_class(width < 100, "-narrow")
        self.set_class(width >= 120, "-wide")

    def on_screen_resume(self) -> None:
        self.on_resize()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Hide keys that do nothing here (no table to filter)."""
        # False hides the key (None would only dim it)
        return not (action == "filter" and not self.has_filter)

    # ------------------------------------------------------------- filter
    def main_table(self) -> VirtualTable | None:
        tables = list(self.query(VirtualTable))
        return tables[0] if tables else None

    def filter_input(self) -> Input | None:
        found = list(self.query("#filter").results(Input))
        return found[0] if found else None

    def filtering_table(self) -> VirtualTable | None:
        """The table ``/`` filters: the one that had focus when ``/`` was pressed."""
        return self._filtering if self._filtering is not None else self.main_table()

    def action_filter(self) -> None:
        box = self.filter_input()
        if box is None:
            self.notify("Nothing to filter on this screen.", timeout=3)
            return
        focused = self.focused
        target = focused if isinstance(focused, VirtualTable) else self.filtering_table()
        previous = self.filtering_table()
        if target is not previous and previous is not None:
            previous.set_filter("")  # one filter box, one table at a time
            box.value = ""
        self._filtering = target
        if target is not None and target.id:
            what = target.id.removesuffix("-table")
            box.placeholder = f"filter {what} as you type (Enter keeps, Esc clears)"
        box.display = True
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            table = self.filtering_table()
            if table is not None:
                table.set_filter(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            table = self.filtering_table()
            if table is not None:
                table.focus()

    def action_back(self) -> None:
        """Escape: leave the filter, then the detail pane, then the pushed screen."""
        box = self.filter_input()
        table = self.filtering_table()
        if box is not None and (box.has_focus or box.value):
            box.value = ""
            box.display = False
            if table is not None:
                table.set_filter("")
                table.focus()
            self._filtering = None
            return
        table = self.main_table()
        if table is not None and not table.has_focus:
            table.focus()
            return
        if len(self.app.screen_stack) > 1 and self.app.screen is self and self.is_modal_like:
            self.app.pop_screen()

    @property
    def is_modal_like(self) -> bool:
        return False

    # --------------------------------------------------------------- copy
    def copy_text(self) -> str:
        panes = list(self.query(DetailPane))
        focused = [p for p in panes if p.has_focus]
        pane = focused[0] if focused else (panes[0] if panes else None)
        return pane.plain if pane is not None else ""

    def action_copy(self) -> None:
        text = self.copy_text()
        if not text:
            self.notify("Nothing to copy here.", timeout=3)
            return
        self.app.copy_to_clipboard(text)
        lines = text.count("\n") + 1
        self.notify(f"Copied {plural(lines, 'line')} to the clipboard (OSC 52).", timeout=3)


class PaneScreen(FleetScreen):
    """A screen pushed over the tabs showing one detail pane (help, problems,
    walkthrough); Escape goes back to where the operator was."""

    pane_id: ClassVar[str] = "pane"

    def compose(self) -> ComposeResult:
        yield from self.compose_top()
        yield DetailPane(id=self.pane_id)
        yield from self.compose_bottom()

    def action_back(self) -> None:
        self.dismiss()

    @property
    def is_modal_like(self) -> bool:
        return True
