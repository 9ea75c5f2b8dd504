"""One call, from parsed body to finished span record; no aiohttp.web, no store, no judge.

The path of a call, in order:

1. `attribution` — who the call belongs to (rollout, attempt, agent, tags, trace);
   `sequencer` gives it the rollout's next sequence number.
2. `router` — the model group and its deployments (weighted, skipping open breakers).
3. `resilience` — per deployment: rate limiter (aiolimiter) and circuit breaker (pybreaker).
4. `forward` — fallbacks, then retries (tenacity), then one send through a provider
   (`gateway.providers`); all before the first byte goes to the client.
5. `streaming` — a stream is relayed event by event while the final object is assembled.
6. `spans` and `cost` — the span record's fields from request, reply, usage and prices;
   `tool_spans` derives `execute_tool` spans from tool results sent back.
7. `recorder` — the finished span goes on the event bus; the store writer, metrics and
   exporters subscribe. Nothing there blocks the call.
"""
