#!/usr/bin/env bash
# Mutation testing of piformer's core (mutmut 3; docs/testing.md). Not part of the test suite.
#   tools/mutation.sh [--jobs N] [--report | --survivors] [entropy config model cost checkpoint train]
# Runs at the lowest CPU priority: it shares the machine with whatever else is running.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec nice -n 19 "$PY" tools/mutation.py "$@"
