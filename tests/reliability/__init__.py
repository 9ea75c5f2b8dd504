"""The reliability suite (issue 5): signals, chaos upstream, bad input, slow clients.

A package, so its `conftest.py` is imported as `reliability.conftest` and never shadows the
top-level `conftest` module other test directories import helpers from.
"""
