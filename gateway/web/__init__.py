"""The aiohttp application: OpenAI routes, `/api` routes, operations routes, middleware,
auth, metrics and the OpenAPI document. It joins the proxy to the store; it knows no judge."""
