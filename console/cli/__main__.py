"""``python -m console.cli`` == ``escort``."""

from console.cli import main

main(prog_name="escort")
