"""When a tool's result makes its span an error: a table of realistic tool outputs under the
default rule, and each rule `tools.error_when` can name."""

from __future__ import annotations

import pytest

from config.models import Settings, ToolErrorWhen
from gateway.proxy.tool_items import ToolResult
from gateway.proxy.tool_spans import looks_like_error

TRACEBACK = """Traceback (most recent call last):
  File "tool.py", line 3, in <module>
    fetch()
ConnectionError: [Errno 111] Connection refused"""

# (what the tool returned, error under the default rule)
RESULTS = [
    # Errors the result itself reports.
    ("Error: city not found", True),
    ("error: permission denied (publickey)", True),
    ("ERROR 2026-11-30 12:00:01 worker crashed", True),
    ("[ERROR] could not open config", True),
    (TRACEBACK, True),
    ("ValueError: invalid literal for int() with base 10: 'x'", True),
    ("requests.exceptions.HTTPError: 404 Client Error: Not Found for url", True),
    ("Exception: quota exhausted", True),
    ("fatal: not a git repository (or any of the parent directories): .git", True),
    ("panic: runtime error: index out of range [3] with length 3", True),
    ('{"error": "upstream timed out"}', True),
    ('{"error": {"code": 404, "message": "no such user"}}', True),
    ('{"is_error": true, "content": "boom"}', True),
    ('{"isError": true, "content": [{"type": "text", "text": "MCP tool failed"}]}', True),
    ('{"status": "error", "message": "invalid id"}', True),
    # Results that mention errors without being one.
    ("Top result: 'How to fix Error 404 in nginx' (stackoverflow.com)", False),
    ("1. Python exceptions tutorial\n2. Handling errors in Go", False),
    ("The request failed with status 404 on the old API, the new one works.", False),
    ("HTTP/1.1 200 OK\ncontent-type: text/html\n\n<h1>Error handling</h1>", False),
    ("2026-11-30 12:00:00 INFO retrying after ERROR in worker 3\nall done", False),
    ("error handling is covered in chapter 7", False),
    ("Errors found: 0", False),
    ("exceptions raised: none", False),
    ('{"error": null, "result": [1, 2, 3]}', False),
    ('{"error": "", "data": "ok"}', False),
    ('{"errors": 0, "warnings": 2}', False),
    ('{"isError": false, "content": [{"type": "text", "text": "Error: is in the text"}]}', False),
    ('{"status": 404}', False),
    ("18C, sunny", False),
    ("", False),
]


@pytest.mark.parametrize(("result", "failed"), RESULTS)
def test_the_default_rule_on_realistic_tool_outputs(result: str, failed: bool) -> None:
    assert looks_like_error(result) is failed


def test_a_status_the_result_item_states_wins_over_its_text() -> None:
    assert looks_like_error(ToolResult("c", "all 12 tests passed", failed=True))
    assert not looks_like_error(ToolResult("c", "Error: printed by the test, exit 0", failed=False))
    assert looks_like_error(ToolResult("c", "Error: no status stated", failed=None))


@pytest.mark.parametrize(
    ("rule", "result", "failed"),
    [
        ("never", '{"error": "x"}', False),
        ("never", ToolResult("c", "exit 1", failed=True), False),
        ("json", "Error: only text", False),
        ("json", '{"isError": true}', True),
        ("json", ToolResult("c", "", failed=True), True),
        (["^FAILED", r"\d+ failed"], "collected 3 items\n2 passed, 1 failed", True),
        (["^FAILED"], "Error: not matched by this tool's rule", False),
        (["^FAILED"], '{"error": "json still counts"}', True),
    ],
)
def test_each_rule(rule: ToolErrorWhen, result: str | ToolResult, failed: bool) -> None:
    assert looks_like_error(result, rule) is failed


def test_rules_are_set_per_tool_by_name() -> None:
    settings = Settings.model_validate(
        {
            "tools": {
                "error_when": "json",
                "per_tool": {"grep": {"error_when": "never"}, "pytest": {"error_when": ["failed"]}},
            }
        }
    )
    assert settings.tools.rule_for("grep") == "never"
    assert settings.tools.rule_for("pytest") == ["failed"]
    assert settings.tools.rule_for("anything else") == "json"


def test_a_rule_that_is_not_a_regular_expression_is_refused_naming_its_key() -> None:
    with pytest.raises(ValueError, match=r"tools\.per_tool\.t\.error_when"):
        Settings.model_validate({"tools": {"per_tool": {"t": {"error_when": ["("]}}}})
