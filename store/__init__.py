"""spangate's store: the SQLite schema, the batched writer and its spill journal.

Reads are imported from their modules (`store.queries`, `store.dashboard`, `store.export`).
"""

from store.errors import Conflict, InvalidTransition, NotFound, StoreError
from store.journal import Journal, journal_path_for
from store.schema import ROLLOUT_STATUSES, SPAN_COLUMNS, TERMINAL_STATUSES, connect, migrate
from store.span_inserts import insert_spans, normalize_span
from store.writer import StoreWriter

__all__ = [
    "ROLLOUT_STATUSES",
    "SPAN_COLUMNS",
    "TERMINAL_STATUSES",
    "Conflict",
    "InvalidTransition",
    "Journal",
    "NotFound",
    "StoreError",
    "StoreWriter",
    "connect",
    "insert_spans",
    "journal_path_for",
    "migrate",
    "normalize_span",
]
