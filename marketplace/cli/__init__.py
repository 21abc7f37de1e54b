"""The ``mercato`` command line: one Typer app with a sub-app per area.

This is the edge of the system: commands that start a node or a coordinator import
those packages lazily, inside the command, so ``marketplace`` itself never depends on
``node`` or ``coordinator`` (checked by ``tests/test_dependency_direction.py``).
"""

from __future__ import annotations

from marketplace.cli.app import app, main

__all__ = ["app", "main"]
