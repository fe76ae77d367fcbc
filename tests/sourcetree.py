"""Parse this project's own source for the tests that read it as a tree.

CPython 3.11 keeps one AST-construction depth counter per interpreter, not per thread (python/cpython#106905
and its kin). `traceback` in 3.11 calls `ast.parse` to place its carets, so a server thread that formats an
exception while the test's thread builds a tree can make `ast.parse` raise `SystemError: AST constructor
recursion depth mismatch` on a file that parses fine (seen once in a fresh-clone CI run). The tree itself is
built whole; only the counter's check fails, so a bounded retry gives the same tree. Any other error, or the
same one three times, is raised.
"""

from __future__ import annotations

import ast
from pathlib import Path

_TRIES = 3


def parse(path: Path) -> ast.Module:
    source = path.read_text(encoding="utf-8")
    for attempt in range(_TRIES):
        try:
            return ast.parse(source, str(path))
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc) or attempt == _TRIES - 1:
                raise
    raise AssertionError("unreachable")
