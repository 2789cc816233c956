"""Modal dialogs. Confirmations start on Cancel: Enter alone never changes anything."""

from __future__ import annotations

from typing import ClassVar

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static


class ConfirmDialog(ModalScreen[bool]):
    """Yes/no with the facts in front of the operator.

    ``type_to_confirm``: the operator must type this (e.g. the VM's name) before the
    confirm button works — a stray Enter or Tab+Enter cannot trigger the action.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="dialog.cancel"),
    ]
    #: Textual focuses the first focusable widget (the name field) when a screen is
    #: shown, which can land after on_mount; name Cancel so it is always Cancel.
    AUTO_FOCUS = "#cancel"

    DEFAULT_CSS = """
    ConfirmDialog { align: center middle; }
    ConfirmDialog > Vertical {
        width: 70; max-width: 95%; height: auto; max-height: 90%;
        border: thick $warning; background: $panel; padding: 0 1;
    }
    ConfirmDialog #dialog-title { text-style: bold; margin-bottom: 1; }
    ConfirmDialog #dialog-body { margin-bottom: 1; }
    ConfirmDialog Horizontal { height: auto; align-horizontal: right; }
    ConfirmDialog Button { margin-left: 1; }
    """

    def __init__(self, title: str, body: str, *, confirm_label: str = "Confirm",
                 type_to_confirm: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.body = body
        self.confirm_label = confirm_label
        self.type_to_confirm = type_to_confirm

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, id="dialog-title")
            yield Static(self.body, id="dialog-body", markup=False)
            if self.type_to_confirm:
                yield Label(f"Type {self.type_to_confirm!r} to confirm:")
                yield Input(id="dialog-typed", select_on_focus=False)
            with Horizontal():
                yield Button("Cancel", id="cancel", variant="primary")
                yield Button(self.confirm_label, id="confirm", variant="error",
                             disabled=bool(self.type_to_confirm))

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one("#confirm", Button).disabled = event.value != self.type_to_confirm

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Typing the exact name and Enter confirms; anything else does nothing."""
        event.stop()
        if self.type_to_confirm and event.value == self.type_to_confirm:
            self.dismiss(True)

    def on_key(self, event: events.Key) -> None:
        """Cancel has the focus, yet typing the name must just work: the first printable
        key moves the focus to the name field (Enter on Cancel still cancels)."""
        if not self.type_to_confirm or not event.is_printable or not event.character:
            return
        typed = self.query_one("#dialog-typed", Input)
        if self.focused is typed:
            return
        event.stop()
        event.prevent_default()
        typed.focus()
        typed.insert_text_at_cursor(event.character)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm")

    def action_cancel(self) -> None:
        self.dismiss(False)
