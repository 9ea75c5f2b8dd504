"""A minimal OTLP/HTTP receiver for bench/otlp.py: decodes each export and counts its spans."""

from __future__ import annotations

import argparse

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

COUNT = web.AppKey("count", list)


async def traces(request: web.Request) -> web.Response:
    message = ExportTraceServiceRequest.FromString(await request.read())
    request.app[COUNT][0] += sum(
        len(scope.spans) for rs in message.resource_spans for scope in rs.scope_spans
    )
    return web.Response(
        body=ExportTraceServiceResponse().SerializeToString(),
        content_type="application/x-protobuf",
    )


async def count(request: web.Request) -> web.Response:
    return web.json_response({"spans": request.app[COUNT][0]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app[COUNT] = [0]
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
