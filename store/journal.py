"""Append-only JSON-lines files for records the database could not take yet (the journal)
and records it will never take (the dead-letter file, kept with the reason)."""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("spangate.journal")


def journal_path_for(
    db_path: str | Path, pid: int | None = None, directory: str | Path | None = None
) -> Path:
    """Where a process spills: `<dir>/<db name>.spill.<pid>.jsonl`, beside the database
    unless `directory` (`recorder.journal_dir`) puts it on another volume.

    Each process spills to its own file, so two processes on one database (a gateway and a
    judge job) never replay each other's live journal; the plain `<db>.spill.jsonl` is
    still read at start.
    """
    db_path = Path(db_path)
    folder = Path(directory) if directory is not None else db_path.parent
    name = f"{db_path.name}.spill.jsonl" if pid is None else f"{db_path.name}.spill.{pid}.jsonl"
    return folder / name


def dead_letter_path_for(db_path: str | Path, directory: str | Path | None = None) -> Path:
    db_path = Path(db_path)
    folder = Path(directory) if directory is not None else db_path.parent
    return folder / f"{db_path.name}.deadletter.jsonl"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _joined(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def _write_new(path: Path, data: bytes) -> None:
    """A file that did not exist, whole or not at all: a half-written one must not be
    replayed as if whole, and an existing one is never written over."""
    try:
        with open(path, "xb") as out:
            out.write(data)
    except FileExistsError:
        raise
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


_OWNER = re.compile(r"\.spill\.(\d+)\.jsonl")
# Marks the kept files of this process: after a kill, a restart may get the same pid (PID 1 in
# a container), and its files are then told from the dead process's by this mark alone.
_INCARNATION = secrets.token_hex(4)
_KEPT = re.compile(r"\.kept\d+(?:-([0-9a-f]+))?$")
# Journals this process's writers hold, by path: a file with this pid's journal name in
# another folder belongs to an earlier process with this pid unless one of them is there.
_HELD: collections.Counter[Path] = collections.Counter()
_HELD_LOCK = threading.Lock()


def _where(path: Path) -> Path:
    return path.parent.resolve() / path.name


def _sweep_partial(path: Path) -> None:
    """Remove a cross-volume copy a kill cut short: its source is removed only once the copy
    is whole, so the data is still there. One a live process is making is left alone."""
    if path.name.endswith(f".{_INCARNATION}.part"):
        return
    owner = _OWNER.search(path.name)
    if owner and int(owner.group(1)) != os.getpid() and _alive(int(owner.group(1))):
        return
    path.unlink(missing_ok=True)


class Journal:
    """Spilled records, one JSON object a line; safe to append from any thread.

    `append` raises `OSError` when the file cannot be written (a full disk): the caller
    decides what to hold instead.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file: Any = None
        # Computed once: a relative path would resolve elsewhere after a change of directory.
        self._where: Path | None = _where(self.path)
        with _HELD_LOCK:
            _HELD[self._where] += 1

    def append(self, lines: list[bytes]) -> None:
        """Records already encoded, one line each (`store.records.journal_line`)."""
        data = _joined(lines)
        with self._lock:
            try:
                if self._file is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(self.path, "ab")  # noqa: SIM115 - held open across appends
                self._file.write(data)
                # Flushed to the OS at once so a process kill keeps it; fsync is left to the OS.
                self._file.flush()
            except OSError:
                # A half-written buffer must not be flushed later as a torn line in the
                # middle of the file: drop the handle, the next append reopens it.
                self._discard_file()
                raise

    def _discard_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                log.warning("journal %s: closing after a failed write failed too", self.path)
            self._file = None

    def write_kept(self, lines: list[bytes]) -> Path:
        """Records the writer still holds in memory, in a file of their own: a kill keeps them
        (a restart claims the file as a dead process's), and the writer deletes it once it
        has stored them, so a burst is never read back from disk. The name sorts by time."""
        path = self.path.with_name(f"{self.path.name}.kept{time.time_ns():020d}-{_INCARNATION}")
        _write_new(path, _joined(lines))
        return path

    def release(self, kept: Path) -> None:
        """A kept file whose records will not be stored from memory: into the replay set."""
        kept.rename(kept.with_name(f"{kept.name}.replay"))

    def has_records(self) -> bool:
        with self._lock:
            try:
                return self.path.stat().st_size > 0
            except OSError:
                return False

    def take(self) -> Path | None:
        """Move the current journal aside for replay; new spills start a fresh file."""
        with self._lock:
            self._discard_file()
            try:
                if self.path.stat().st_size == 0:
                    return None
            except FileNotFoundError:
                return None
            taken = self.path.with_name(f"{self.path.name}.{os.getpid()}.replay")
            if taken.exists():
                # A replay file left by an earlier, unfinished replay: keep its records too.
                with open(taken, "ab") as out, open(self.path, "rb") as src:
                    out.write(src.read())
                self.path.unlink()
            else:
                self.path.rename(taken)
            return taken

    def replay_files(self) -> list[Path]:
        """Files set aside for replay and not yet done."""
        return sorted(self.path.parent.glob(f"{self.path.name}.*.replay"))

    def pending_files(self) -> list[Path]:
        """Every file waiting for replay (left over and current), each once, oldest first."""
        paths = self.replay_files()
        taken = self.take()
        if taken is not None and taken not in paths:
            paths.append(taken)
        return paths

    def claim_orphans(self, db_path: str | Path) -> None:
        """Take over journals left by processes that are gone (and the shared legacy file),
        beside the database and in the journal's own folder.

        A rename is atomic, so when two processes start together only one gets each file.
        """
        db_path = Path(db_path)
        folders = {db_path.parent.resolve(), self.path.parent.resolve()}
        for folder in sorted(folders):
            for path in sorted(folder.glob(f"{db_path.name}.spill*")):
                if path.name.endswith(".part"):
                    _sweep_partial(path)
                    continue
                if path == self.path or not self._orphaned(path):
                    continue
                target = self._free_orphan_name()
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    path.rename(target)
                except FileNotFoundError:
                    continue  # another process claimed it first
                except OSError as exc:
                    # Another volume: rename cannot cross it, so copy then remove.
                    log.info("moving orphan journal %s across volumes (%s)", path, exc)
                    try:
                        self._copy_orphan(path, target)
                    except OSError as failed:
                        # It stays where it is, whole, for a later start.
                        log.warning("orphan journal %s not moved: %s", path, failed)

    @staticmethod
    def _copy_orphan(path: Path, target: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return  # another process copied it first
        # Under a name no replay reads until it is whole; one a kill left is swept at start.
        partial = target.with_name(f"{target.name}.{_INCARNATION}.part")
        _write_new(partial, data)
        try:
            partial.rename(target)
        except OSError:
            partial.unlink(missing_ok=True)
            raise
        path.unlink(missing_ok=True)

    def _free_orphan_name(self) -> Path:
        """A replay name no file has: an earlier process with this pid may have left an
        orphan replay unfinished, and a rename would replace it."""
        for n in itertools.count():
            name = f"{self.path.name}.orphan{time.time_ns():020d}-{n}.{os.getpid()}.replay"
            target = self.path.with_name(name)
            if not target.exists():
                return target
        raise AssertionError("unreachable")  # pragma: no cover

    def _orphaned(self, path: Path) -> bool:
        """Whether a spill file belongs to no live process: another pid that is gone, or an
        earlier process that had this pid (a kept file not marked by this one, which holds
        none at start, or a file where no journal of this process is)."""
        own = self.path.name
        if path.name == own or path.name.startswith(f"{own}."):
            if path.parent.resolve() != self.path.parent.resolve():
                # `recorder.journal_dir` moved since that process ran.
                with _HELD_LOCK:
                    return not _HELD[path.parent.resolve() / own]
            kept = _KEPT.search(path.name)
            return kept is not None and kept.group(1) != _INCARNATION
        owner = _OWNER.search(path.name)
        return not (owner and _alive(int(owner.group(1))))

    def close(self) -> None:
        with self._lock:
            self._discard_file()
            if self._where is not None:
                with _HELD_LOCK:
                    _HELD[self._where] -= 1
                self._where = None


@dataclass(frozen=True, slots=True)
class BadLine:
    """A journal line that is not a JSON object (torn by a kill, or corrupted)."""

    number: int
    text: bytes
    reason: str


def read_records(path: Path) -> Iterator[dict[str, Any] | BadLine]:
    """Every line of a journal file, as a record or as a `BadLine` to quarantine."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield BadLine(number, line, f"not JSON: {exc}")
                continue
            if isinstance(record, dict):
                yield record
            else:
                yield BadLine(number, line, "not a JSON object")


class DeadLetters:
    """Records the store refused for good, one per line with the reason and when."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.count = 0

    def add(self, record: Any, reason: str) -> bool:
        """Keep the record; False when even that failed (counted as lost by the caller)."""
        entry = {"time_ns": time.time_ns(), "reason": reason, "record": record}
        try:
            line = orjson.dumps(entry)
        except TypeError:
            line = json.dumps(entry, default=repr, ensure_ascii=True).encode()
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "ab") as f:
                    f.write(line + b"\n")
            except OSError as exc:
                log.error("dead-letter file %s not writable (%s): record lost", self.path, exc)
                return False
            self.count += 1
        return True
