"""The console's config file: ``<user config dir>/escort/config.toml``.

```toml
readonly = true          # same as --readonly
theme = "escort-dark"    # a shipped or user theme name
[keymap]                 # binding id -> keys (comma separated for several)
"app.vms" = "3,f3"
```

A broken config must never stop an on-call admin from opening the console: problems
come back as one-line strings for a notification, and defaults apply.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from console.adapters.files import read_limited
from console.core.errors import InputError

DEFAULT_THEME = "escort-dark"


def config_dir() -> Path:
    """Where config.toml and themes/ live (XDG on Linux)."""
    return Path(platformdirs.user_config_dir("escort"))


@dataclass
class UIConfig:
    readonly: bool = False
    theme: str = DEFAULT_THEME
    keymap: dict[str, str] = field(default_factory=dict)
    source: str = ""


def load_config(path: Path | None = None) -> tuple[UIConfig, list[str]]:
    """Read the config file if there is one -> (config, one-line problems)."""
    path = path or config_dir() / "config.toml"
    cfg = UIConfig(source=str(path))
    if not path.exists():
        return cfg, []
    try:
        data = tomllib.loads(read_limited(path, what="config file").decode("utf-8"))
    except InputError as exc:
        return cfg, [str(exc)]
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return cfg, [f"{path}: not valid TOML ({exc}); using defaults"]
    problems: list[str] = []
    known = {"readonly", "theme", "keymap"}
    for key in sorted(set(data) - known):
        problems.append(f"{path}: unknown setting {key!r} ignored")
    readonly = data.get("readonly", False)
    if isinstance(readonly, bool):
        cfg.readonly = readonly
    else:
        problems.append(f"{path}: readonly must be true or false")
    theme = data.get("theme", DEFAULT_THEME)
    if isinstance(theme, str):
        cfg.theme = theme
    else:
        problems.append(f"{path}: theme must be a string")
    keymap = data.get("keymap", {})
    if isinstance(keymap, dict):
        for binding_id, keys in keymap.items():
            if isinstance(keys, str) and keys.strip():
                cfg.keymap[str(binding_id)] = keys
            else:
                problems.append(f"{path}: keymap {binding_id!r} must be a non-empty string of keys")
    else:
        problems.append(f"{path}: [keymap] must be a table of binding id = \"keys\"")
    return cfg, problems
