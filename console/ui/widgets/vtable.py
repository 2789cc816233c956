"""A table that renders only the rows on screen (Textual's Line API).

Why not ``DataTable``: given 10,000 rows it builds and measures every row before the
first paint (about 2.4 s on the reference machine). Here rows are plain tuples of
strings; ``render_line`` turns just the visible ones into segments, so first paint and
every filter keystroke cost the same whatever the fleet size. Filtering runs over a
lowercase string per row computed once in ``set_rows``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

#: Cell tones map to component classes; every tone is paired with a glyph or a word
#: in the cell text itself, so colour is never the only signal.
TONES = ("ok", "bad", "warn", "dim", "strong")


@dataclass(frozen=True, slots=True)
class Column:
    label: str
    width: int  # minimum width in cells
    flex: bool = False  # takes the space left over (at most one flex column is useful)


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    cells: tuple[str, ...]
    tones: tuple[str, ...] = ()  # per cell, "" for default
    search: str = field(default="", compare=False)  # lowercase text the filter matches


def make_row(key: str, cells: Sequence[str], tones: Sequence[str] = ()) -> Row:
    """Build a row with its filter string precomputed once."""
    cells_t = tuple(cells)
    return Row(key, cells_t, tuple(tones), " ".join(cells_t).lower())


class VirtualTable(ScrollView, can_focus=True):
    """Rows on demand; one cursor; messages when the cursor moves or a row is chosen."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor(-1)", "Up", show=False, id="table.up"),
        Binding("down", "cursor(1)", "Down", show=False, id="table.down"),
        Binding("pageup", "page(-1)", "Page up", show=False, id="table.pageup"),
        Binding("pagedown", "page(1)", "Page down", show=False, id="table.pagedown"),
        Binding("home", "jump(0)", "First", show=False, id="table.home"),
        Binding("end", "jump(-1)", "Last", show=False, id="table.end"),
        Binding("enter", "choose", "Open", show=False, id="table.choose"),
    ]

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "vtable--header",
        "vtable--cursor",
        "vtable--cursor-blur",
        "vtable--ok",
        "vtable--bad",
        "vtable--warn",
        "vtable--dim",
        "vtable--strong",
        "vtable--empty",
    }

    DEFAULT_CSS = """
    VirtualTable {
        background: $surface;
        height: 1fr;
        scrollbar-size-vertical: 1;
        overflow-x: hidden;
    }
    VirtualTable > .vtable--header { text-style: bold; background: $panel; }
    VirtualTable > .vtable--cursor {
        background: $block-cursor-background; color: $block-cursor-foreground; text-style: bold;
    }
    VirtualTable > .vtable--cursor-blur { background: $block-cursor-blurred-background; }
    VirtualTable > .vtable--ok { color: $success; }
    VirtualTable > .vtable--bad { color: $error; }
    VirtualTable > .vtable--warn { color: $warning; }
    VirtualTable > .vtable--dim { color: $text-muted; }
    VirtualTable > .vtable--strong { text-style: bold; }
    VirtualTable > .vtable--empty { color: $text-muted; text-style: italic; }
    """

    cursor: reactive[int] = reactive(0, always_update=True, init=False)

    class Highlighted(Message):
        """The cursor is on a new row (``key`` is None when nothing matches)."""

        def __init__(self, table: VirtualTable, key: str | None) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> VirtualTable:
            return self.table

    class Chosen(Message):
        """Enter (or a double click) on a row."""

        def __init__(self, table: VirtualTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> VirtualTable:
            return self.table

    def __init__(
        self,
        columns: Sequence[Column],
        *,
        show_header: bool = True,
        group_rows: bool = False,
        empty_text: str = "nothing to show",
        no_rows_text: str = "",
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.columns = list(columns)
        self.show_header = show_header
        #: rows sharing a key (a host and its reason lines) are filtered as one group
        self.group_rows = group_rows
        self.empty_text = empty_text  # the filter hides every row
        self.no_rows_text = no_rows_text or empty_text  # there are no rows at all
        self._rows: list[Row] = []
        self._view: list[int] = []  # indexes into _rows that pass the filter
        self._filter = ""
        self._widths: list[int] = [c.width for c in self.columns]
        self._last_key: str | None = None

    # ----------------------------------------------------------------- data
    @property
    def row_count(self) -> int:
        """Rows currently shown (after the filter)."""
        return len(self._view)

    @property
    def total_count(self) -> int:
        return len(self._rows)

    @property
    def filter_text(self) -> str:
        return self._filter

    def visible_keys(self) -> list[str]:
        return [self._rows[i].key for i in self._view]

    def rows_in_view(self) -> list[Row]:
        """Rows that pass the filter, in order (for copying what is shown)."""
        return [self._rows[i] for i in self._view]

    def row_for(self, key: str) -> Row | None:
        for row in self._rows:
            if row.key == key:
                return row
        return None

    def set_rows(self, rows: Sequence[Row], *, keep_key: bool = True) -> None:
        """Replace every row; keep the cursor on the same key when it still exists."""
        key = self.cursor_key if keep_key else None
        self._rows = list(rows)
        self._apply_filter(key)

    def update_rows(self, rows: Sequence[Row], changed: set[str] | frozenset[str]) -> None:
        """Same keys in the same order, new content for ``changed`` keys: repaint only when
        one of them is on screen (a fleet's verdicts streaming in cost no repaints offscreen)."""
        if len(rows) != len(self._rows) or self._filter:
            self.set_rows(rows)
            return
        self._rows = list(rows)
        top = self.scroll_offset.y
        on_screen = self._view[top:top + max(self.size.height, 1)]
        if any(self._rows[i].key in changed for i in on_screen):
            self.refresh()

    def replace_row(self, row: Row) -> None:
        """Replace the row with ``row.key`` in place (filter and cursor unchanged)."""
        for i, old in enumerate(self._rows):
            if old.key == row.key:
                self._rows[i] = row
                self.refresh()
                return

    def set_filter(self, text: str) -> None:
        """Show only rows whose text contains ``text`` (case-insensitive substring)."""
        key = self.cursor_key
        self._filter = text.strip().lower()
        self._apply_filter(key)

    def _apply_filter(self, keep: str | None) -> None:
        needle = self._filter
        if needle and self.group_rows:
            keys = {row.key for row in self._rows if needle in row.search}
            self._view = [i for i, row in enumerate(self._rows) if row.key in keys]
        elif needle:
            self._view = [i for i, row in enumerate(self._rows) if needle in row.search]
        else:
            self._view = list(range(len(self._rows)))
        new_cursor = 0
        if keep is not None:
            for pos, i in enumerate(self._view):
                if self._rows[i].key == keep:
                    new_cursor = pos
                    break
        self._update_virtual_size()
        self.cursor = new_cursor
        if keep is None:
            self.scroll_to(y=0, animate=False, immediate=True)  # a new list starts at its top
        else:
            self._scroll_cursor_into_view()  # the cursor may not have moved, the rows did
        self.refresh()

    @property
    def cursor_key(self) -> str | None:
        if 0 <= self.cursor < len(self._view):
            return self._rows[self._view[self.cursor]].key
        return None

    def move_to_key(self, key: str) -> bool:
        """Put the cursor on ``key`` (clearing a filter that hides it)."""
        for pos, i in enumerate(self._view):
            if self._rows[i].key == key:
                self.cursor = pos
                return True
        if self._filter and any(r.key == key for r in self._rows):
            self._filter = ""
            self._apply_filter(key)
            return True
        return False

    # ------------------------------------------------------------- geometry
    @property
    def _header_height(self) -> int:
        return 1 if self.show_header else 0

    def _update_virtual_size(self) -> None:
        self.virtual_size = Size(self.size.width, len(self._view) + self._header_height)

    def on_resize(self, event: events.Resize) -> None:
        self._layout_columns(event.size.width)
        self._update_virtual_size()
        self._scroll_cursor_into_view()

    def _layout_columns(self, width: int) -> None:
        # one space between columns, one cell reserved for the scrollbar
        available = max(width - 1, 1)
        gaps = max(len(self.columns) - 1, 0)
        fixed = sum(c.width for c in self.columns) + gaps
        spare = max(available - fixed, 0)
        widths = [c.width for c in self.columns]
        flex = [i for i, c in enumerate(self.columns) if c.flex]
        if flex:
            share, extra = divmod(spare, len(flex))
            for n, i in enumerate(flex):
                widths[i] += share + (1 if n < extra else 0)
        self._widths = widths

    # ------------------------------------------------------------ rendering
    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if self.show_header and y == 0:
            header = self.get_component_rich_style("vtable--header")
            return self._strip(self._header_cells(), header, (), width)
        index = self.scroll_offset.y + y - self._header_height
        if not self._view:
            if index == 0:
                style = self.get_component_rich_style("vtable--empty")
                text = self.empty_text if self._rows else self.no_rows_text
                return Strip([Segment(set_cell_size(" " + text, width), style)], width)
            return Strip.blank(width, self.rich_style)
        if index < 0 or index >= len(self._view):
            return Strip.blank(width, self.rich_style)
        row = self._rows[self._view[index]]
        if index == self.cursor:
            cls = "vtable--cursor" if self.has_focus else "vtable--cursor-blur"
            base = self.rich_style + self.get_component_rich_style(cls)
            return self._strip(row.cells, base, (), width)
        return self._strip(row.cells, self.rich_style, row.tones, width)

    def _header_cells(self) -> tuple[str, ...]:
        return tuple(c.label for c in self.columns)

    def _strip(self, cells: Sequence[str], base: Style, tones: Sequence[str], width: int) -> Strip:
        segments: list[Segment] = []
        used = 0
        for i, w in enumerate(self._widths):
            text = cells[i] if i < len(cells) else ""
            tone = tones[i] if i < len(tones) else ""
            style = base + self.get_component_rich_style(f"vtable--{tone}") if tone else base
            if cell_len(text) > w and w > 1:
                text = set_cell_size(text, w - 1) + "…"
            segments.append(Segment(set_cell_size(text, w), style))
            used += w
            if i < len(self._widths) - 1:
                segments.append(Segment(" ", base))
                used += 1
        if used < width:
            segments.append(Segment(" " * (width - used), base))
        return Strip(segments, max(width, used)).crop(0, width)

    # ----------------------------------------------------------- behaviour
    def watch_cursor(self, old: int, new: int) -> None:
        if self._view:
            clamped = max(0, min(new, len(self._view) - 1))
            if clamped != new:
                self.cursor = clamped
                return
        self._scroll_cursor_into_view()
        self.refresh()
        key = self.cursor_key
        if key != self._last_key:
            self._last_key = key
            self.post_message(self.Highlighted(self, key))

    def _scroll_cursor_into_view(self) -> None:
        body = max(self.size.height - self._header_height, 1)
        top = self.scroll_offset.y
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + body:
            self.scroll_to(y=self.cursor - body + 1, animate=False, immediate=True)

    def action_cursor(self, delta: int) -> None:
        self.cursor = max(0, min(self.cursor + delta, len(self._view) - 1))

    def action_page(self, direction: int) -> None:
        body = max(self.size.height - self._header_height - 1, 1)
        self.action_cursor(direction * body)

    def action_jump(self, where: int) -> None:
        self.cursor = 0 if where == 0 else max(len(self._view) - 1, 0)

    def action_choose(self) -> None:
        key = self.cursor_key
        if key is not None:
            self.post_message(self.Chosen(self, key))

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    def on_click(self, event: events.Click) -> None:
        index = self.scroll_offset.y + event.y - self._header_height
        if 0 <= index < len(self._view):
            self.cursor = index
            if event.chain >= 2:
                self.action_choose()
