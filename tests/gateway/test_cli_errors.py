"""Mistakes a user makes on the command line end in one clear `Error:` line (or click's
usage error), never a traceback, and are never accepted to then do something else.

`serve` runs as a real process (it sets up logging and binds); the other commands run in
this process with `catch_exceptions=False`, so a traceback fails the test as itself.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from raw_upstream import RawUpstream
from servers import free_port, wait_until
from shapes import CLI_ARGV, span_record

from gateway.cli.main import cli
from store.schema import connect
from store.span_inserts import insert_spans

MOCK_GROUP = "models:\n  - name: mock\n    deployments: [{provider: mock, model: mock}]\n"


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_error_line(result: Result, *needles: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert "Error:" in result.stderr, result.output
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture
def recorded_db(tmp_path: Path) -> Path:
    path = tmp_path / "spangate.db"
    db = connect(path)
    insert_spans(db, [span_record("r-1", 1)])
    db.close()
    return path


# -- spangate serve ---------------------------------------------------------------------


def serve_outcome(tmp_path: Path, *args: str) -> tuple[int | None, str]:
    """Start `spangate serve ARGS`: (exit code, output) once it exits, or (None, output) once
    it says it is listening (then it is stopped)."""
    log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*CLI_ARGV, "serve", *args], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_until(
                lambda: process.poll() is not None or "listening on" in log_path.read_text(),
                timeout=60,
            )
        finally:
            running = process.poll() is None
            if running:
                process.kill()
            process.wait(timeout=10)
    return (None if running else process.returncode), log_path.read_text(errors="replace")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "70000"], "70000 is not a port"),  # it bound 70000 - 65536 = 4464
        (["--port", "65536"], "65536 is not a port"),  # it bound a random port
        (["--log-level", "verbose"], "--log-level"),
    ],
)
def test_serve_with_a_bad_option_is_a_usage_error(args: list[str], needle: str) -> None:
    result = CliRunner().invoke(cli, ["serve", *args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr, result.stderr


def test_serve_that_cannot_start_says_why_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(MOCK_GROUP)
    (tmp_path / "latin1.yaml").write_bytes(b"# \xe9crit\n" + MOCK_GROUP.encode())
    (tmp_path / "vllm.yaml").write_text(
        "models:\n  - name: local\n    deployments:\n"
        "      - {provider: openai, model: m, api_base: 'localhost:8000/v1'}\n"
    )
    db = tmp_path / "no" / "such" / "folder" / "spangate.db"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = [
            (["--config", "c.yaml", "--port", str(free_port()), "--db", str(db)], str(db)),
            (["--config", "latin1.yaml", "--port", str(free_port())], "latin1.yaml: not UTF-8"),
            (["--config", "vllm.yaml", "--port", str(free_port())], "api_base: expected an http"),
            (["--config", "c.yaml", "--port", port], port),
        ]
        for args, needle in cases:
            code, output = serve_outcome(tmp_path, *args)
            assert code == 1 and "Traceback" not in output, output
            assert output.count("Error:") == 1 and needle in output, output


def test_serve_on_ipv6_loopback_prints_a_url_that_works(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(MOCK_GROUP)
    port = str(free_port())
    code, output = serve_outcome(tmp_path, "--config", "c.yaml", "--host", "::1", "--port", port)
    assert code is None, output
    assert f"listening on http://[::1]:{port}" in output, output


# -- the store ----------------------------------------------------------------------


def test_a_write_into_a_file_that_is_not_a_spangate_store_leaves_it_unchanged(
    tmp_path: Path,
) -> None:
    # A mistyped --db naming another program's SQLite file (or an empty file): a write
    # would migrate spangate's tables into it.
    other = tmp_path / "app.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    empty = tmp_path / "empty.db"
    empty.touch()
    for path in (other, empty):
        result = run("reward", "r-1", "--value", "1", "--db", str(path))
        assert_error_line(result, f"{path} is not a spangate database")
    conn = sqlite3.connect(other)
    tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    conn.close()
    assert tables == ["users"]
    assert empty.stat().st_size == 0


@pytest.mark.parametrize(
    "args", [["judge", "run"], ["tail"], ["reward", "r-1", "--value", "1"]], ids=str
)
def test_a_postgresql_store_that_is_down_is_one_line_with_the_password_masked(
    args: list[str],
) -> None:
    url = f"postgresql://spangate:hunter2-secret@127.0.0.1:{free_port()}/spangate"
    result = run(*args, "--db", url)
    assert_error_line(result)
    assert "hunter2-secret" not in result.output


def test_judge_run_with_a_config_uses_its_store_url(
    tmp_path: Path, recorded_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # README, `store.url`: "`--db` / `$SPANGATE_DB` win; default spangate.db".
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPANGATE_DB", raising=False)
    (tmp_path / "data").mkdir()
    recorded_db.rename(tmp_path / "data" / "spans.db")
    (tmp_path / "spangate.yaml").write_text(MOCK_GROUP + "store: {url: data/spans.db}\n")
    result = run("judge", "run", "--json")
    assert result.exit_code == 0, result.output
    assert '"r-1"' in result.stdout
    assert not (tmp_path / "spangate.db").exists()


# -- output files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["export", "-o", "{out}/rollouts.jsonl"],
        ["export", "--format", "parquet", "-o", "{out}/rl.parquet"],
        ["report", "r-1", "-o", "{out}/r-1.html"],
    ],
    ids=["jsonl", "parquet", "report"],
)
def test_output_into_a_folder_that_does_not_exist_is_one_error_line(
    tmp_path: Path, recorded_db: Path, args: list[str]
) -> None:
    out = tmp_path / "no" / "such" / "folder"
    result = run(*(a.format(out=out) for a in args), "--db", str(recorded_db))
    assert_error_line(result, f"cannot write {out}/")


@pytest.mark.parametrize(
    "args", [["export", "--rollout", "r-1"], ["report", "r-1"]], ids=["export", "report"]
)
def test_output_to_a_named_pipe_is_written_into_the_pipe(
    tmp_path: Path, recorded_db: Path, args: list[str]
) -> None:
    # `-o >(gzip > out.gz)` or a FIFO: a file moved over the pipe would leave its reader
    # nothing (and waiting forever), and the FIFO replaced by a regular file.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        result = run(*args, "-o", str(fifo), "--db", str(recorded_db))
        assert result.exit_code == 0, result.output
        assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the named pipe was replaced by a file"
        received = b""
        while piece := os.read(reader, 65536):
            received += piece
        assert b"r-1" in received
    finally:
        os.close(reader)


# -- arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["tail", "-n", "99999999999999999999"],
        ["rollouts", "-n", "9223372036854775807"],
        ["prune", "--older-than", "1d", "--batch", "99999999999999999999"],
    ],
    ids=["tail", "rollouts", "prune-batch"],
)
def test_a_count_past_any_store_means_all(recorded_db: Path, args: list[str]) -> None:
    # It was an OverflowError from SQLite's 64-bit LIMIT.
    result = run(*args, "--db", str(recorded_db))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args",
    [
        ["show", "r-\udcff"],
        ["reward", "r-\udcff", "--value", "1"],
        ["export", "--rollout", "r-\udcff"],
    ],
    ids=["show", "reward", "export"],
)
def test_an_argument_that_is_not_utf8_is_a_usage_error(recorded_db: Path, args: list[str]) -> None:
    # A rollout id pasted from a Latin-1 terminal reaches Python as a lone surrogate.
    result = run(*args, "--db", str(recorded_db))
    assert_error_line(result, "argument 'r-\\xff' is not UTF-8 text", code=2)


def test_calibrate_labels_that_are_not_utf8_is_one_error_line(
    tmp_path: Path, recorded_db: Path
) -> None:
    labels = tmp_path / "labels.jsonl"
    labels.write_bytes(b'{"rollout_id": "r-1", "label": "r\xe9ussi"}\n')
    result = run("judge", "calibrate", "--labels", str(labels), "--db", str(recorded_db))
    assert_error_line(result, f"cannot read {labels}: not UTF-8")


# -- remote commands (--url) ----------------------------------------------------------


@pytest.fixture
def not_a_gateway() -> Iterator[RawUpstream]:
    """Something else answering at the address: an SSO proxy's sign-in page, with 200."""
    upstream = RawUpstream(pause=0)
    body = b"<html><body>Sign in</body></html>"
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    for _ in range(10):
        upstream.add(head + body)
    yield upstream
    upstream.close()


@pytest.mark.parametrize(
    "args", [["reward", "r-1", "--value", "1"], ["tail", "-n", "5"]], ids=["reward", "tail"]
)
def test_url_that_answers_with_something_not_json_is_one_error_line(
    not_a_gateway: RawUpstream, args: list[str]
) -> None:
    result = run(*args, "--url", not_a_gateway.url.removesuffix("/v1"))
    assert_error_line(result, "did not answer as a spangate gateway", "text/html")


@pytest.mark.parametrize(
    ("url", "key", "needle"),
    [
        ("http://[::1", None, "is not a URL"),
        ("http://127.0.0.1:1", "clé-secrète", "--key"),
        ("http://127.0.0.1:1", "ab\ncd", "--key"),
    ],
    ids=["malformed-url", "non-ascii-key", "newline-in-key"],
)
def test_reward_url_with_a_bad_url_or_key_is_one_error_line(
    url: str, key: str | None, needle: str
) -> None:
    args = ["reward", "r-1", "--value", "1", "--url", url]
    if key is not None:
        args += ["--key", key]
    result = run(*args)
    assert_error_line(result, needle)
    assert "secrète" not in result.output
