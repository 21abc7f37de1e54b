"""Settings refused at start-up, said the way a person fixes them."""

from __future__ import annotations

from typing import Any

import typer


def settings_refused(exc: Any, env_prefix: str) -> typer.BadParameter:
    """A pydantic ``ValidationError`` of a settings class as one line per bad field:
    the field, what is wrong, the value given and where else it can come from."""
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        given = f"got {error['input']!r}; " if "input" in error else ""
        lines.append(
            f"{field}: {error['msg']} ({given}set by its option or {env_prefix}{field.upper()})"
        )
    return typer.BadParameter("\n".join(lines))
