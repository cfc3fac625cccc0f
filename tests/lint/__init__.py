"""Checks that `make lint` runs beyond ruff and mypy (import-linter's custom contract types)."""
