"""An append-only JSON-lines file that holds records the database could not take yet."""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("spangate.journal")


def journal_path_for(db_path: str | Path, pid: int | None = None) -> Path:
    """The journal lives beside the database so a restart finds it.

    Each process spills to its own file (`<db>.spill.<pid>.jsonl`), so two processes on
    one database (a gateway and a judge job) never replay each other's live journal; the
    plain `<db>.spill.jsonl` is still read at start.
    """
    return Path(f"{db_path}.spill.jsonl" if pid is None else f"{db_path}.spill.{pid}.jsonl")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_OWNER = re.compile(r"\.spill\.(\d+)\.jsonl")


class Journal:
    """Spilled records, one JSON object a line; safe to append from any thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file: Any = None

    def append(self, records: list[dict[str, Any]]) -> None:
        data = b"".join(orjson.dumps(record) + b"\n" for record in records)
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "ab")  # noqa: SIM115 - held open across appends
            self._file.write(data)
            # Flushed to the OS at once so a process kill keeps it; fsync is left to the OS.
            self._file.flush()

    def has_records(self) -> bool:
        with self._lock:
            return self.path.exists() and self.path.stat().st_size > 0

    def take(self) -> Path | None:
        """Move the current journal aside for replay; new spills start a fresh file."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if not self.path.exists() or self.path.stat().st_size == 0:
                return None
            taken = self.path.with_name(f"{self.path.name}.{os.getpid()}.replay")
            if taken.exists():
                # A replay file left by a crash during replay: keep its records too.
                with open(taken, "ab") as out, open(self.path, "rb") as src:
                    out.write(src.read())
                self.path.unlink()
            else:
                self.path.rename(taken)
            return taken

    def leftover_replays(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.*.replay"))

    def claim_orphans(self, db_path: str | Path) -> None:
        """Take over journals left by processes that are gone (and the shared legacy file).

        A rename is atomic, so when two processes start together only one gets each file.
        """
        db_path = Path(db_path)
        counter = itertools.count()
        for path in sorted(db_path.parent.glob(f"{db_path.name}.spill*")):
            if path == self.path or path.name.startswith(f"{self.path.name}."):
                continue
            owner = _OWNER.search(path.name)
            if owner and _alive(int(owner.group(1))):
                continue
            target = self.path.with_name(
                f"{self.path.name}.orphan{next(counter)}.{os.getpid()}.replay"
            )
            try:
                path.rename(target)
            except FileNotFoundError:
                continue  # another process claimed it first

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every whole record in a journal file; a torn last line (killed mid-write) is skipped."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("journal %s line %d is not whole JSON, skipped", path, number)
