"""The training-free transfer: the engine (`transfer()`), its input checks, the worker pool, and
the report (table, JSON, heat map)."""

from .engine import print_tables, transfer

__all__ = ["transfer", "print_tables"]
