"""The command line; ``main`` here stays the console script's entry point (pyproject.toml)."""

from ckptd.cli.commands import main as main
