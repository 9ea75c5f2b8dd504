"""The store fails (the database file is full): the gateway keeps proxying, spills to the
journal, reports not-ready, and writes everything back once the store takes writes again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import openai
from servers import GatewayThread, read_rows, wait_until

LONG_TEXT = "x" * 4000  # big bodies fill the few free pages at once


def page_limit(gateway: GatewayThread, pages: int | None) -> None:
    """Cap the database at its current size (full), or lift the cap; runs on the writer."""

    def apply(db: object) -> None:
        conn = db.conn  # type: ignore[attr-defined]
        count = conn.execute("pragma page_count").fetchone()[0]
        conn.execute(f"pragma max_page_count = {count if pages is None else pages}")

    asyncio.run_coroutine_threadsafe(gateway.gw.writer.execute(apply), gateway.loop).result(10)


def ready_status(gateway: GatewayThread) -> int:
    return httpx.get(f"{gateway.base}/health/ready", timeout=5).status_code


def test_a_full_database_spills_reports_not_ready_and_recovers_without_loss(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    gateway = make_gateway()
    client = openai.OpenAI(base_url=gateway.url("full", "1"), api_key="x", max_retries=0)
    acknowledged: list[str] = []

    def call(text: str) -> None:
        raw = client.chat.completions.with_raw_response.create(
            model="mock", messages=[{"role": "user", "content": text}]
        )
        acknowledged.append(raw.headers["X-Span-Id"])

    try:
        for _ in range(3):
            call("before")
        gateway.flush()
        page_limit(gateway, None)  # full from here on
        for _ in range(30):
            call(LONG_TEXT)  # still answered
        wait_until(lambda: gateway.gw.writer.spilled > 0, what="spans to spill")
        assert gateway.gw.writer.journal.path.exists()
        wait_until(lambda: ready_status(gateway) == 503, what="/health/ready to say not ready")

        page_limit(gateway, 1_000_000)  # the disk has room again
        wait_until(lambda: ready_status(gateway) == 200, timeout=10, what="recovery")
        wait_until(
            lambda: (
                len(read_rows(gateway.db_path, "select span_id from spans")) >= len(acknowledged)
            ),
            timeout=10,
            what="the journal to be written back",
        )
        stored = {r["span_id"] for r in read_rows(gateway.db_path, "select span_id from spans")}
        assert set(acknowledged) <= stored
        assert len(acknowledged) == 33
        seqs = [r["seq"] for r in read_rows(gateway.db_path, "select seq from spans order by seq")]
        assert seqs == list(range(1, 34))
    finally:
        client.close()
