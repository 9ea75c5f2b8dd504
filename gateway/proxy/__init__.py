"""One call, from parsed body to finished span record; no aiohttp.web, no store, no judge.

The path of a call, in order:

1. `payload` parses and checks the body once; `attribution` says who the call belongs to
   (rollout, attempt, agent, tags, trace); `sequencer` gives it the rollout's next number;
   `call` opens its span.
2. Before anything goes upstream: `gate` (a pause holds or refuses it), `experiments`
   (the rollout's variant changes model, params or prompt), `budgets` (reserved, or refused
   with 402), `training` (token ids and logprobs asked for).
3. `router` — the model group and its deployments (weighted, skipping open breakers).
4. `resilience` — per deployment: rate limiter (aiolimiter) and circuit breaker (pybreaker).
5. `forward` — fallbacks, then retries (tenacity), then one send through a provider
   (`gateway.providers`); all before the first byte goes to the client.
6. `streaming` — a stream is relayed event by event while the final object is assembled.
7. `spans` and `cost` — the span record's fields from request, reply, usage and prices;
   `tool_spans` derives `execute_tool` spans from tool results sent back.
8. `call.publish()` builds the record (`record.SpanRecord`), settles the budget, and
   `recorder` puts it on the event bus; the store writer, metrics and
   exporters subscribe. Nothing there blocks the call.
"""
