"""Errors the store raises; they know nothing of HTTP (the gateway maps them to statuses).

- StoreError
  - NotFound: the named row does not exist.
  - InvalidTransition: a status change the state machine forbids.
  - Conflict: a write clashes with what is already stored.
  - StoreBusy: the store cannot take this write now (locked, full, stopping); try again.
  - StoreUnavailable: the store named cannot be opened at all (URL, password, server).
  - InvalidValue: a value the store cannot hold (PostgreSQL: a NUL in text, a number out
    of range); the request was at fault, not the store.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base for every error the store raises on purpose."""


class NotFound(StoreError):
    """The named row does not exist."""


class InvalidTransition(StoreError):
    """A status change the state machine forbids (a terminal rollout is final)."""


class Conflict(StoreError):
    """A write clashes with what is already stored (same id, different content)."""


class StoreBusy(StoreError):
    """The store cannot take this write now (locked, full, or the writer is stopping)."""


class StoreUnavailable(StoreError):
    """The store named by `--db` / `store.url` cannot be opened (bad URL, refused, wrong
    password); the message names it with the password masked."""


class InvalidValue(StoreError):
    """A value given to a query that the store cannot hold (PostgreSQL refuses a NUL
    character in text, for one); what was asked is refused, the store is fine."""
