"""``python -m marketplace.cli``: the same as the ``mercato`` command."""

from marketplace.cli.app import main

main()
