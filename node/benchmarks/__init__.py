"""Benchmarks of the node that print numbers (``run(json_output) -> dict`` each)."""
