"""`spangate serve` with one of its parts switched off, to weigh that part in CPU per call
(bench/hop_floors.py). A measuring instrument only: a gateway run this way loses what the
part does (budgets unchecked, spans unrecorded, metrics unkept).

    python bench/_ablated_gateway.py PART serve --db ... --config ...

PART: budgets (no reservation or settle), metrics (no Prometheus observations), writer (spans
built and published but never stored), recording (no span built or published at all), front
(aiohttp's server on the OpenAI routes too, as `server.front: aiohttp`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def switch_off(part: str) -> None:
    if part == "budgets":
        from gateway.proxy.budgets import Budgets

        async def admit(self: Budgets, call: Any, group: Any, headers: Any) -> Any:
            return call.raw_request, call.payload

        Budgets.admit = admit  # type: ignore[method-assign]
    elif part == "metrics":
        from gateway.web.metrics import Metrics

        Metrics.observe = lambda self, span: None  # type: ignore[method-assign]
    elif part == "writer":
        from store.writer import StoreWriter

        StoreWriter.put = lambda self, record: None  # type: ignore[method-assign]
    elif part == "recording":
        from gateway.proxy.call import Call

        Call.publish = lambda self, response_body=None: None  # type: ignore[method-assign]
    elif part == "front":
        from aiohttp import web

        import gateway.server

        async def aiohttp_only(runner: Any, settings: Any, host: str, port: int, grace: Any = 0):
            site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
            await site.start()
            return site

        gateway.server.listen = aiohttp_only  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown part {part!r}: budgets, metrics, writer, recording or front")


def main() -> None:
    switch_off(sys.argv.pop(1))
    from gateway.cli.main import cli

    sys.argv[0] = "spangate"
    cli()


if __name__ == "__main__":
    main()
