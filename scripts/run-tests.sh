#!/usr/bin/env bash
# Runs the whole test suite: SQLite and, when reachable, PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest "$@"
