"""The aiohttp application: OpenAI routes, `/api` routes, operations routes, middleware,
auth, metrics and the OpenAPI document, and the front (`front.py`) that serves the OpenAI
routes before it. It joins the proxy to the store; it knows no judge."""
