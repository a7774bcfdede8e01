"""`python -m tdiff` is the `tdiff` command (also what `accelerate launch -m tdiff` runs)."""

from tdiff.cli import run

run()
