"""The source-tree parser retries only CPython 3.11's shared-counter SystemError, and only a bounded number of times."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import sourcetree


def _flaky(failures: int, message: str = "AST constructor recursion depth mismatch (before=90, after=65)"):
    real = ast.parse
    calls = {"n": 0}

    def parse(*args: object, **kwargs: object) -> ast.Module:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise SystemError(message)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    return parse, calls


def test_a_counter_mismatch_is_retried_and_gives_the_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "m.py"
    source.write_text("x = 1\n")
    parse, calls = _flaky(2)
    monkeypatch.setattr(sourcetree.ast, "parse", parse)
    tree = sourcetree.parse(source)
    assert calls["n"] == 3
    assert isinstance(tree.body[0], ast.Assign)


def test_the_mismatch_every_time_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "m.py"
    source.write_text("x = 1\n")
    parse, calls = _flaky(3)
    monkeypatch.setattr(sourcetree.ast, "parse", parse)
    with pytest.raises(SystemError, match="recursion depth mismatch"):
        sourcetree.parse(source)
    assert calls["n"] == 3


def test_any_other_error_is_raised_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "m.py"
    source.write_text("x = 1\n")
    parse, calls = _flaky(1, "something else")
    monkeypatch.setattr(sourcetree.ast, "parse", parse)
    with pytest.raises(SystemError, match="something else"):
        sourcetree.parse(source)
    assert calls["n"] == 1
    (tmp_path / "bad.py").write_text("def (:\n")
    with pytest.raises(SyntaxError):
        sourcetree.parse(tmp_path / "bad.py")
