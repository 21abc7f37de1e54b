"""Where Mercato keeps its files: one data directory, ``$MERCATO_HOME`` or ``~/.mercato``."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "MERCATO_HOME"


def default_home() -> Path:
    """The data directory: ``$MERCATO_HOME`` if set, else ``~/.mercato``."""
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser() if value else Path.home() / ".mercato"
