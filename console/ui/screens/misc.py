"""Smaller screens: migrations (placeholder, labelled honestly), help and problems."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType

from console.ui.screens.base import FleetScreen
from console.ui.text import BAD
from console.ui.widgets.detail import DetailPane


class MigrationsScreen(FleetScreen):
    screen_label = "Migrations"
    def compose(self) -> ComposeResult:
        yield from self.compose_top()
        yield DetailPane(id="migrations")
        yield from self.compose_bottom()

    def on_mount(self) -> None:
        kind = self.escort.service.kind
        lines = [
            "Migrations — not built yet.",
            "",
            "This tab will list running and past migrations with live progress,",
            "abort, and the audit log. Migration arrives with real hosts (the lab",
            "or a real fleet) in a later release.",
        ]
        if kind == "demo":
            lines += ["", "This is the demo fleet on libvirt's test driver: nothing really migrates."]
        self.query_one(DetailPane).show("\n".join(lines))


class HelpScreen(FleetScreen):
    """Keys as currently mapped (the keymap in config.toml changes them)."""

    screen_label = "Help"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="help.back"),
    ]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        yield from self.compose_top()
        yield DetailPane(id="help")
        yield from self.compose_bottom()

    def on_mount(self) -> None:
        self.sub_title = "help"
        pane = self.query_one(DetailPane)
        pane.show(self.text)
        pane.focus()

    def action_back(self) -> None:
        self.dismiss()

    @property
    def is_modal_like(self) -> bool:
        return True


class ProblemsScreen(FleetScreen):
    """Every problem found while loading, each with where it belongs and one-line why."""

    screen_label = "Problems"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="problems.back"),
    ]

    def compose(self) -> ComposeResult:
        yield from self.compose_top()
        yield DetailPane(id="problems")
        yield from self.compose_bottom()

    def on_mount(self) -> None:
        self.sub_title = "problems"
        problems = self.escort.all_problems()
        text = Text()
        if not problems:
            text.append("No problems: the fleet file, trust directory and policies all loaded.")
        for line in problems:
            text.append(f"{BAD} ", style=self.escort.tones()["bad"])
            text.append(line + "\n")
        pane = self.query_one(DetailPane)
        pane.show(text)
        pane.focus()

    def action_back(self) -> None:
        self.dismiss()

    @property
    def is_modal_like(self) -> bool:
        return True
