"""The layers stay where the folder list says they are.

Each module is imported in a fresh interpreter and we look at sys.modules, so an
indirect import (core -> something -> textual) is caught too.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import console.adapters
import console.core

FORBIDDEN = {
    "console.core": ("textual", "asyncssh", "libvirt", "console.adapters", "console.ui"),
    "console.adapters": ("textual", "console.ui"),
}


def _modules(package: object) -> list[str]:
    path = package.__path__  # type: ignore[attr-defined]
    prefix = package.__name__ + "."  # type: ignore[attr-defined]
    return [m.name for m in pkgutil.walk_packages(path, prefix)]


CASES = [(m, bad) for pkg in (console.core, console.adapters) for m in [pkg.__name__, *_modules(pkg)]
         for bad in [FORBIDDEN[pkg.__name__]]]


@pytest.mark.parametrize(("module", "forbidden"), CASES, ids=[c[0] for c in CASES])
def test_module_does_not_pull_in_forbidden_packages(module: str, forbidden: tuple[str, ...]) -> None:
    code = (
        f"import sys, {module}\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {forbidden!r} or "
        f"any(m == f or m.startswith(f + '.') for f in {forbidden!r})]\n"
        "print(','.join(sorted(bad)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_core_does_no_file_io() -> None:
    """No open()/pathlib reads in the core: bytes come in through the adapters."""
    import pathlib

    core_dir = pathlib.Path(console.core.__file__).parent
    offenders = []
    for path in core_dir.rglob("*.py"):
        text = path.read_text()
        for needle in ("open(", "read_bytes(", "read_text(", "write_bytes(", "write_text(",
                       "import os", "from pathlib", "import pathlib", "import subprocess"):
            if needle in text:
                offenders.append(f"{path.name}: {needle}")
    assert offenders == []
