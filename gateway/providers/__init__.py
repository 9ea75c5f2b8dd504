"""The seam to models: every provider is one callable `send(request) -> UpstreamResponse`.

`openai` forwards to any OpenAI-compatible API, `mock` answers locally with no network, and
`litellm` translates for every other provider litellm knows.
"""
