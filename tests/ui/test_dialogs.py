"""The typed confirmation: Cancel has the focus, yet typing the name just works."""

from __future__ import annotations

from textual.app import App
from textual.widgets import Button, Input

from console.ui.widgets.dialogs import ConfirmDialog


class Host(App[None]):
    def __init__(self) -> None:
        super().__init__()
        self.results: list[bool | None] = []

    def open(self, name: str = "app-1") -> None:
        self.push_screen(ConfirmDialog("Migrate app-1?", "facts", confirm_label="Migrate",
                                       type_to_confirm=name), self.results.append)


async def test_enter_alone_cancels() -> None:
    app = Host()
    async with app.run_test(size=(80, 24)) as pilot:
        app.open()
        await pilot.pause()
        assert isinstance(app.focused, Button) and app.focused.id == "cancel"
        await pilot.press("enter")
        await pilot.pause()
    assert app.results == [False]


async def test_typing_the_name_while_cancel_is_focused_then_enter_confirms() -> None:
    app = Host()
    async with app.run_test(size=(80, 24)) as pilot:
        app.open()
        await pilot.pause()
        await pilot.press(*"app-1")
        typed = app.screen.query_one("#dialog-typed", Input)
        assert typed.value == "app-1" and app.focused is typed
        assert not app.screen.query_one("#confirm", Button).disabled
        await pilot.press("enter")
        await pilot.pause()
    assert app.results == [True]


async def test_a_wrong_name_and_enter_do_nothing() -> None:
    app = Host()
    async with app.run_test(size=(80, 24)) as pilot:
        app.open()
        await pilot.pause()
        await pilot.press(*"app-2", "enter")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDialog) and app.results == []
        assert app.screen.query_one("#confirm", Button).disabled
        await pilot.press("escape")
        await pilot.pause()
    assert app.results == [False]
