"""The console's parts without the whole app: table, themes, config, text, demo."""

from __future__ import annotations

import datetime as dt
import filecmp
from pathlib import Path

import pytest
from textual.app import App, ComposeResult

from console.core.errors import InputError
from console.core.issuance import DEFAULT_POLICY_NAMES
from console.demo import CAS, HOSTS, VMS, ensure_demo, generate, generated_at
from console.ui.config import load_config
from console.ui.text import expiry_words, kind_label, policy_words, wrap
from console.ui.themes import load_theme_dirs, parse_theme, shipped_theme_dir
from console.ui.widgets.vtable import Column, VirtualTable, make_row

AT = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


class _TableApp(App[None]):
    def compose(self) -> ComposeResult:
        yield VirtualTable([Column("Name", 10), Column("Text", 10, flex=True)], id="t")


async def test_virtual_table_filters_precomputed_rows_and_keeps_cursor() -> None:
    app = _TableApp()
    async with app.run_test(size=(40, 10)) as pilot:
        table = app.query_one(VirtualTable)
        table.set_rows([make_row(f"k{i}", [f"Row-{i}", "even" if i % 2 == 0 else "odd"])
                        for i in range(1000)])
        table.move_to_key("k10")
        table.set_filter("EVEN")  # case-insensitive, any column
        assert table.row_count == 500
        assert table.cursor_key == "k10"  # the cursor stays on the same row
        table.set_filter("row-99")
        assert table.visible_keys() == ["k99", "k990", "k991", "k992", "k993", "k994", "k995",
                                        "k996", "k997", "k998", "k999"]
        table.set_filter("no such thing")
        assert table.row_count == 0 and table.cursor_key is None
        table.set_filter("")
        assert table.row_count == 1000
        await pilot.press("end")
        assert table.cursor_key == "k999"


async def test_grouped_rows_filter_together() -> None:
    app = _TableApp()
    async with app.run_test(size=(40, 10)):
        table = app.query_one(VirtualTable)
        table.group_rows = True
        table.set_rows([make_row("a", ["a", "header"]), make_row("a", ["", "reason x"]),
                        make_row("b", ["b", "header"]), make_row("b", ["", "reason y"])])
        table.set_filter("reason y")
        assert [r.cells for r in table.rows_in_view()] == [("b", "header"), ("", "reason y")]


def test_shipped_themes_all_load() -> None:
    themes, failures = load_theme_dirs([shipped_theme_dir()])
    assert failures == []
    assert {t.name for t in themes} >= {"escort-dark", "escort-light", "escort-high-contrast",
                                        "escort-colour-blind"}


@pytest.mark.parametrize(("text", "error"), [
    ("name = 'x'\nprimary = 'nope'", "is not a colour"),
    ("primary = '#fff'", "needs a name"),
    ("name = 'x'", "needs a primary"),
    ("name = 'x'\nprimary = '#fff'\nshiny = true", "unknown key 'shiny'"),
    ("name = [", "not valid TOML"),
])
def test_bad_theme_files_give_one_line_naming_the_file(text: str, error: str) -> None:
    with pytest.raises(InputError) as exc:
        parse_theme(text.encode(), "mine.toml")
    message = str(exc.value)
    assert message.startswith("mine.toml: ") and error in message and "\n" not in message


def test_user_theme_overrides_and_bad_ones_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("name = 'escort-dark'\nprimary = '#123456'\n")
    (tmp_path / "b.toml").write_text("garbage = \n")
    themes, failures = load_theme_dirs([shipped_theme_dir(), tmp_path])
    dark = next(t for t in themes if t.name == "escort-dark")
    assert dark.primary == "#123456"
    assert len(failures) == 1 and "b.toml" in failures[0]


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    cfg, problems = load_config(path)
    assert (cfg.readonly, problems) == (False, [])  # no file: defaults, no complaint
    path.write_text('readonly = true\ntheme = "escort-light"\ncolour = 1\n'
                    '[keymap]\n"app.trust" = "t"\n"app.vms" = ""\n')
    cfg, problems = load_config(path)
    assert cfg.readonly and cfg.theme == "escort-light" and cfg.keymap == {"app.trust": "t"}
    assert len(problems) == 2 and any("colour" in p for p in problems)
    path.write_text("readonly = [")
    cfg, problems = load_config(path)
    assert not cfg.readonly and "not valid TOML" in problems[0]


def test_text_helpers() -> None:
    assert expiry_words(AT - dt.timedelta(days=3), AT) == ("✗ expired 3 d ago", "bad")
    assert expiry_words(AT + dt.timedelta(days=5, hours=1), AT)[1] == "warn"
    assert "nothing really migrates" in kind_label("demo")
    assert policy_words([DEFAULT_POLICY_NAMES["assurance:high"], "1.2.3.4"]) == "assurance:high, 1.2.3.4"
    assert policy_words([]) == "none"
    words = "one two three four five six seven eight nine ten eleven twelve"
    lines = wrap(words, 20, "  ")
    assert all(len(line) <= 20 for line in lines) and lines[1].startswith("  ")
    assert " ".join(x.strip() for x in lines) == words


def test_demo_is_deterministic_with_a_seed(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", at=AT, seed="s")
    b = generate(tmp_path / "b", at=AT, seed="s")
    for sub in ("trust", "hosts", "owners-trust", "policies", "grants", "nodes"):
        cmp = filecmp.dircmp(a.parent / sub, b.parent / sub)
        assert not cmp.diff_files and not cmp.left_only and not cmp.right_only, sub
    c = generate(tmp_path / "c", at=AT, seed="other")
    assert (a.parent / "trust/root-ca.pem").read_bytes() != (c.parent / "trust/root-ca.pem").read_bytes()
    assert len(list((a.parent / "nodes").glob("*.xml"))) == len(HOSTS)
    assert len(CAS) == 3 and len(VMS) >= 25


def test_demo_is_reused_then_regenerated_when_stale(tmp_path: Path) -> None:
    dest = tmp_path / "demo"
    path, made = ensure_demo(dest, at=AT)
    assert made and path.is_file() and generated_at(dest) == AT
    _, made = ensure_demo(dest, at=AT + dt.timedelta(days=1))
    assert not made
    _, made = ensure_demo(dest, at=AT + dt.timedelta(days=1), regenerate=True)
    assert made
    _, made = ensure_demo(dest, at=AT + dt.timedelta(days=10))
    assert made  # older than 5 days: dates would have drifted
    assert not list(tmp_path.glob(".demo-*")) and not (tmp_path / "demo.old").exists()


def test_escort_demo_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from console.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["demo", "--dir", str(tmp_path / "d"), "--print-path"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "d" / "fleet.toml")
    assert (tmp_path / "d" / "nodes" / "fra-01.xml").is_file()
    result = runner.invoke(main, ["demo", "--dir", str(tmp_path / "d"), "--at", "yesterday"])
    assert result.exit_code == 2 and "RFC 3339" in result.output
    assert len(result.output.strip().splitlines()) == 1
    monkeypatch.delenv("ESCORT_FLEET", raising=False)
    result = runner.invoke(main, [])
    assert result.exit_code == 2 and "escort demo" in result.output
