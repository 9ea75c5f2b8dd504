"""Which client headers reach an upstream: what the client would have sent it directly, less
hop-by-hop headers, credentials and spangate's own, filtered by the deployment's
`forward_headers`."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Mapping

from config.models import Deployment

# Describe one connection, or are recomputed for the body the gateway sends (it decodes a
# compressed request and re-encodes nothing; aiohttp negotiates its own compression).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "content-type",
        "accept-encoding",
        "expect",
        "forwarded",
        "via",
        "x-real-ip",
    }
)
# Replaced by the deployment's key (or, for a keyless deployment, the client's own
# `Authorization`, which `upstream_headers` handles itself).
CREDENTIALS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "api-key",
        "x-api-key",
        "x-goog-api-key",
        "cookie",
        "x-provider-authorization",
    }
)
# spangate's own request headers (attribution, budgets, modes) and proxies' `X-Forwarded-*`.
OWN_PREFIXES = (
    "x-rollout-",
    "x-attempt-",
    "x-agent-",
    "x-budget-",
    "x-meta-",
    "x-spangate-",
    "x-forwarded-",
    "proxy-",
)
OWN_HEADERS = frozenset({"x-tags"})


def never_forwarded(name: str) -> bool:
    """Whether a (lower-case) header name is kept from every upstream, whatever the config."""
    return (
        name in HOP_BY_HOP
        or name in CREDENTIALS
        or name in OWN_HEADERS
        or name.startswith(OWN_PREFIXES)
    )


@functools.lru_cache(maxsize=256)
def _matcher(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(fnmatch.translate(p.lower()) for p in patterns))


def client_headers_for(
    deployment: Deployment, client_headers: Mapping[str, str], *, skip: frozenset[str] = frozenset()
) -> dict[str, str]:
    """The client's headers (lower-case names) this deployment gets, `Authorization` aside."""
    policy = deployment.forward_headers
    everything = policy.allow == ["*"] and not policy.deny
    allow, deny = _matcher(tuple(policy.allow)), _matcher(tuple(policy.deny))
    headers: dict[str, str] = {}
    for name, value in client_headers.items():
        if never_forwarded(name) or name in skip:
            continue
        if everything or (
            allow is not None
            and allow.match(name) is not None
            and (deny is None or deny.match(name) is None)
        ):
            headers[name] = value
    return headers
