"""bench.native: the mypyc build of the first-seen hot path still builds and imports (``--pure-vs-compiled``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import native

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="mypyc needs a C compiler")
def test_the_hot_path_modules_compile_with_mypyc_and_import(tmp_path: Path) -> None:
    """Fails when a module on the list cannot be compiled or its extension fails at import (as a class with
    `__slots__` did: "mypyc classes can't have __slots__"), or when the compiled tree is not the one imported."""
    tree = tmp_path / "compiled"
    shutil.copytree(ROOT / "verifier", tree / "verifier", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    native.build(tree)
    probe = (
        "import importlib, sys\n"
        "from bench import native\n"
        f"mods = {list(native.MODULES)!r}\n"
        "for m in mods: importlib.import_module(m)\n"
        "import verifier.cli\n"  # the whole app imports against them
        "print(native.running_compiled(), all(sys.modules[m].__file__.endswith('.so') for m in mods))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True"]
