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


IO_MODULES = {"os", "pathlib", "shutil", "subprocess", "socket", "tempfile", "io", "sqlite3"}
IO_METHODS = {"read_bytes", "read_text", "write_bytes", "write_text", "mkdir", "unlink"}


def test_core_does_no_file_io() -> None:
    """No open(), no os/pathlib/subprocess in the core: bytes come in through the adapters."""
    import ast
    import pathlib

    core_dir = pathlib.Path(console.core.__file__).parent
    offenders = []
    for path in sorted(core_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]] if node.level == 0 else []
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                names = ["open()"] if node.func.id == "open" else []
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                names = [node.func.attr + "()"] if node.func.attr in IO_METHODS else []
            else:
                continue
            offenders += [f"{path.name}:{node.lineno}: {n}" for n in names
                          if n in IO_MODULES or n.endswith("()")]
    assert offenders == []
