"""A scrollable, copyable text pane (detail views, walkthroughs, problem lists)."""

from __future__ import annotations

import re

from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static


class DetailPane(VerticalScroll, can_focus=True):
    """Keeps the plain text it shows so ``c`` can copy exactly what is on screen."""

    DEFAULT_CSS = """
    DetailPane { background: $surface; padding: 0 1; }
    DetailPane:focus { background-tint: $foreground 4%; }
    DetailPane > Static { width: 1fr; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._plain = ""
        self._body = Static("", markup=False)

    def compose(self):  # type: ignore[no-untyped-def]
        yield self._body

    @property
    def plain(self) -> str:
        return self._plain

    def show(self, content: Text | str | RenderableType, plain: str | None = None) -> None:
        """Show ``content``; ``plain`` is what ``c`` copies (defaults to the text itself).

        Plain strings keep their layout when a narrow pane wraps them: an indented
        line wraps under its indent, a "Label   value" line wraps under its value.
        """
        if isinstance(content, str):
            plain = content if plain is None else plain
            content = hanging(content)
        if plain is None:
            plain = content.plain if isinstance(content, Text) else ""
        self._plain = plain
        self._body.update(content)
        self.scroll_home(animate=False)


_LABEL = re.compile(r"^(\s*\S(?:[^ ]| (?! ))*\s{2,})(?=\S)")


def hanging(text: str) -> Group:
    """Lines with hanging indents (see ``DetailPane.show``)."""
    parts: list[RenderableType] = []
    for line in text.split("\n"):
        label = _LABEL.match(line)
        if label is not None and len(label.group(1)) <= 20:
            grid = Table.grid()
            grid.add_column(width=len(label.group(1)), no_wrap=True)
            grid.add_column(ratio=1, overflow="fold")
            grid.add_row(label.group(1), Text(line[len(label.group(1)):]))
            parts.append(grid)
        else:
            lead = len(line) - len(line.lstrip(" "))
            parts.append(Padding(Text(line[lead:]), (0, 0, 0, lead)))
    return Group(*parts)


class IndentedLines:
    """Lines with a hanging indent: wrapped text stays under its own bullet."""

    def __init__(self) -> None:
        self.items: list[tuple[int, Text]] = []

    def add(self, indent: int, *parts: str | tuple[str, str]) -> None:
        self.items.append((indent, Text.assemble(*parts)))

    def blank(self) -> None:
        self.items.append((0, Text("")))

    def renderable(self) -> Group:
        return Group(*(Padding(text, (0, 0, 0, indent)) for indent, text in self.items))

    def plain(self) -> str:
        return "\n".join(" " * indent + text.plain for indent, text in self.items)
