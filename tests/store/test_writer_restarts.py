"""A restart after a kill finds every span the dead process had journaled: its kept files
(even with the same pid, PID 1 in a container, and after `recorder.journal_dir` moved), orphan
replays it left unfinished, and the rollout numbers those spans hold while the store still
refuses writes."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from shapes import span_record
from writers import count, lines, opened

from gateway.compose import writer_for
from store import journal
from store.journal import Journal, journal_path_for
from store.records import journal_line

DEAD = 2**22 + 4321  # above pid_max: no such process
DEAD2 = 2**22 + 4322


def test_kept_files_of_an_earlier_process_with_this_pid_are_replayed(tmp_path: Path) -> None:
    # The dead process had this pid: its kept files carry its own mark (or none, from a
    # build before the mark), never this process's.
    db = tmp_path / "s.db"
    own = journal_path_for(db, os.getpid())
    marked = own.with_name(f"{own.name}.kept{1:020d}-{'0' * 9}")
    marked.write_bytes(lines(*(span_record("r1", seq) for seq in (1, 2, 3))))
    unmarked = own.with_name(f"{own.name}.kept{2:020d}")
    unmarked.write_bytes(lines(span_record("r1", 4)))
    writer = writer_for(db)
    writer.start()
    writer.close(timeout=10)
    assert count(db) == 4
    assert sorted(p.name for p in tmp_path.glob("s.db.spill*")) == []


def test_claiming_an_orphan_never_replaces_an_unfinished_orphan_replay(tmp_path: Path) -> None:
    # An earlier process with this pid claimed a dead journal and was killed before replaying
    # it; the journal of another dead process claimed now must not take its name.
    db = tmp_path / "s.db"
    own = journal_path_for(db, os.getpid())
    earlier = own.with_name(f"{own.name}.orphan0.{os.getpid()}.replay")
    earlier.write_bytes(lines(*(span_record("r1", seq) for seq in (1, 2, 3))))
    dead = journal_path_for(db, 2**22 + 12345)  # above pid_max: no such process
    dead.write_bytes(lines(span_record("r1", 4), span_record("r1", 5)))
    writer = writer_for(db)
    writer.start()
    writer.close(timeout=10)
    assert count(db) == 5


def test_every_waiting_file_keeps_its_rollout_numbers_while_the_store_refuses_writes(
    tmp_path: Path,
) -> None:
    # A backlog spans many files. The replay stops at the first one the store refuses, yet a
    # rollout journaled in a later file must not be numbered again from what the store shows.
    db = tmp_path / "s.db"
    writer = opened(db)
    own = writer.journal.path
    own.with_name(f"{own.name}.kept{1:020d}.replay").write_bytes(lines(span_record("a", 4)))
    own.with_name(f"{own.name}.kept{2:020d}.replay").write_bytes(lines(span_record("b", 7)))

    def locked(_records: list[dict[str, Any]]) -> int:
        raise sqlite3.OperationalError("database is locked")

    writer._insert_isolating = locked  # type: ignore[method-assign]
    writer._replay_journal()
    assert not writer.healthy
    assert (writer.unsaved_seq("a"), writer.unsaved_seq("b")) == (4, 7)


def test_a_kept_file_stays_while_its_spans_are_only_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk: the kept file cannot join the replay, the journal cannot take its spans
    # either, so they are held in memory, and the file is the one copy a kill would keep.
    db = tmp_path / "s.db"
    writer = opened(db)
    records = [span_record("r1", seq) for seq in (1, 2, 3)]
    path = writer.journal.write_kept([journal_line(r) for r in records])

    def full(*_: Any, **__: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    writer.journal.release = full  # type: ignore[method-assign]
    writer.journal.append = full  # type: ignore[method-assign]
    writer._release(path, records)
    assert writer.held == 3
    assert path.exists()
    # Back to normal: the held spans are stored, and a restart's replay of the file adds none.
    del writer.journal.append
    writer._retry_held()
    assert count(db) == 3
    writer._db.close()
    # The next process (a new incarnation) replays the file, and adds nothing twice.
    monkeypatch.setattr(journal, "_INCARNATION", "1" * 9)
    later = writer_for(db)
    later.start()
    later.close(timeout=10)
    assert count(db) == 3
    assert list(tmp_path.glob("s.db.spill*")) == []


def test_the_same_pid_journal_beside_the_database_is_replayed_after_journal_dir_moves(
    tmp_path: Path,
) -> None:
    db = tmp_path / "s.db"
    # The dead process (this pid) journaled beside the database, and left a replay too.
    dead = journal_path_for(db, os.getpid())
    dead.write_bytes(lines(span_record("r1", 1), span_record("r1", 2)))
    dead.with_name(f"{dead.name}.{os.getpid()}.replay").write_bytes(lines(span_record("r1", 3)))
    elsewhere = tmp_path / "journals"
    elsewhere.mkdir()
    writer = writer_for(db, journal_dir=str(elsewhere))
    writer.start()
    writer.close(timeout=10)
    assert count(db) == 3
    assert list(tmp_path.glob("s.db.spill*")) == []


def test_an_orphan_another_process_copied_first_across_volumes_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # journal_dir on another volume: rename fails (EXDEV) for both processes starting
    # together; the other one copies and removes the orphan before this one reads it.
    db = tmp_path / "s.db"
    dead = journal_path_for(db, 2**22 + 12345)  # above pid_max: no such process
    dead.write_bytes(lines(span_record("r1", 1)))
    elsewhere = tmp_path / "journals"
    elsewhere.mkdir()
    rename = Path.rename

    def cross(self: Path, target: Any) -> Any:
        if self == dead:
            self.unlink()  # the other process finished its copy meanwhile
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", cross)
    writer = writer_for(db, journal_dir=str(elsewhere))
    raised: Exception | None = None
    try:
        writer.start()
    except FileNotFoundError as exc:  # out of claim_orphans: the gateway does not start
        raised = exc
    writer.close(timeout=10)
    if writer._db is not None:
        writer._db.close()
    leftovers = sorted(p.name for p in elsewhere.iterdir())
    assert (raised, leftovers) == (None, [])


@pytest.mark.parametrize("copier", ["this pid", "another dead pid"])
def test_a_copy_a_kill_cut_short_is_swept_not_replayed(tmp_path: Path, copier: str) -> None:
    # The killed process was copying a dead process's journal across volumes into
    # journal_dir: its torn `.part` file is neither left behind nor replayed (a half line
    # would go to the dead-letter file); the whole source is replayed instead.
    db = tmp_path / "s.db"
    elsewhere = tmp_path / "journals"
    elsewhere.mkdir()
    source = journal_path_for(db, DEAD)
    source.write_bytes(lines(span_record("r1", 1), span_record("r1", 2)))
    pid = os.getpid() if copier == "this pid" else DEAD2
    killed = journal_path_for(db, pid, elsewhere)
    part = killed.with_name(f"{killed.name}.orphan{time.time_ns():020d}-0.{pid}.replay.part")
    part.write_bytes(source.read_bytes()[:-20])
    writer = writer_for(db, journal_dir=str(elsewhere))
    writer.start()
    writer.close(timeout=10)
    assert (count(db), writer.quarantined) == (2, 0)
    assert sorted(p.name for p in elsewhere.iterdir()) == []


def test_held_count_follows_the_journal_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative journal path (a PostgreSQL label, or a relative --db) resolved against
    # one cwd at __init__ and another at close: the count under the first stays forever.
    here, there, elsewhere = tmp_path / "here", tmp_path / "there", tmp_path / "journals"
    for folder in (here, there, elsewhere):
        folder.mkdir()
    monkeypatch.chdir(here)
    relative = Journal(journal_path_for("s.db", os.getpid()))
    monkeypatch.chdir(there)
    relative.close()
    # An earlier process with this pid journaled beside the database in `here`.
    db = here / "s.db"
    journal_path_for(db, os.getpid()).write_bytes(lines(span_record("r1", 1)))
    writer = writer_for(db, journal_dir=str(elsewhere))
    writer.start()
    writer.close(timeout=10)
    assert count(db) == 1
