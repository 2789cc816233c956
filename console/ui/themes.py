"""Theme files (TOML) -> ``textual.theme.Theme``.

Shipped themes live in ``themes/`` at the top of the project (installed copies are
found next to the package); users add their own in ``<config dir>/escort/themes/``.
A broken file must not take the console down: loading returns ``(themes, failures)``
and the app shows one notification naming each failed file.

File format (every key except ``name`` and ``primary`` is optional)::

    name = "escort-dark"
    dark = true
    primary = "#5fafff"
    secondary = "#87afd7"
    accent = "#ffaf5f"
    warning = "#ffd75f"
    error = "#ff5f5f"
    success = "#5fd75f"
    foreground = "#e4e4e4"
    background = "#1c1c1c"
    surface = "#262626"
    panel = "#303030"
    [variables]
    "block-cursor-background" = "#5fafff"
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path

from textual.color import Color, ColorParseError
from textual.theme import Theme

from console.adapters.files import read_limited
from console.core.errors import InputError

_COLOUR_KEYS = ("primary", "secondary", "warning", "error", "success", "accent",
                "foreground", "background", "surface", "panel", "boost")
_ALLOWED = {*_COLOUR_KEYS, "name", "dark", "variables", "luminosity_spread", "text_alpha"}


def shipped_theme_dir() -> Path:
    """``themes/`` in a source checkout (the package sits next to it)."""
    return Path(__file__).resolve().parent.parent.parent / "themes"


def parse_theme(data: bytes, source: str) -> Theme:
    """One theme file's bytes -> Theme, or a one-line InputError naming ``source``."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{source}: not valid TOML ({exc})") from exc
    unknown = sorted(set(doc) - _ALLOWED)
    if unknown:
        raise InputError(f"{source}: unknown key {unknown[0]!r}")
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{source}: needs a name = \"...\"")
    colours: dict[str, str] = {}
    for key in _COLOUR_KEYS:
        if key in doc:
            value = doc[key]
            if not isinstance(value, str):
                raise InputError(f"{source}: {key} must be a colour string")
            try:
                Color.parse(value)
            except ColorParseError as exc:
                raise InputError(f"{source}: {key} = {value!r} is not a colour") from exc
            colours[key] = value
    if "primary" not in colours:
        raise InputError(f"{source}: needs a primary colour")
    dark = doc.get("dark", True)
    if not isinstance(dark, bool):
        raise InputError(f"{source}: dark must be true or false")
    variables = doc.get("variables", {})
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise InputError(f"{source}: [variables] must map names to strings")
    get = colours.get
    return Theme(name=name.strip(), primary=colours["primary"], secondary=get("secondary"),
                 warning=get("warning"), error=get("error"), success=get("success"),
                 accent=get("accent"), foreground=get("foreground"), background=get("background"),
                 surface=get("surface"), panel=get("panel"), boost=get("boost"), dark=dark,
                 variables={str(k): v for k, v in variables.items()})


def load_theme_dirs(dirs: Iterable[Path]) -> tuple[list[Theme], list[str]]:
    """Every ``*.toml`` in ``dirs`` (later dirs override earlier names) -> (themes, failures)."""
    themes: dict[str, Theme] = {}
    failures: list[str] = []
    for directory in dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            try:
                theme = parse_theme(read_limited(path, what="theme file"), str(path))
            except InputError as exc:
                failures.append(str(exc))
                continue
            themes[theme.name] = theme
    return list(themes.values()), failures
