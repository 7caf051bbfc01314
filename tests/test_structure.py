"""The size limits that keep every module readable in one sitting.

No module over 500 lines and no function over 80 in the product packages, the
harness, the benchmarks and the demo (tests are exempt: a test reads top to
bottom). A module that grows past the limit is doing two jobs; split it by
concern rather than raising the number.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKED = ("p2preg", "tracker", "harness", "bench", "scripts")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    return sorted(p for root in CHECKED for p in (REPO / root).rglob("*.py"))


def test_the_checked_folders_hold_code() -> None:
    names = {p.relative_to(REPO).parts[0] for p in _sources()}
    assert {"p2preg", "tracker", "harness", "bench"} <= names


def test_no_module_is_over_the_limit() -> None:
    long = {
        str(p.relative_to(REPO)): n
        for p in _sources()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: split them by concern"


def test_no_function_is_over_the_limit() -> None:
    long = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(REPO)}:{node.lineno} {node.name}"] = lines
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} lines"
