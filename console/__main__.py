"""``python -m console`` == ``escort``."""

from console.cli import main

main(prog_name="escort")
