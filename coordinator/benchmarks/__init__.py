"""Benchmarks of the coordinator, run with ``mercato bench NAME [--json]``.

Each module exposes ``run(json_output: bool) -> dict``: it prints a table for people and
returns the numbers (the CLI prints them as the last line, one JSON object).
"""
