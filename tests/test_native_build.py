"""The compiled hot path (scripts/build_native.py, verifier/native.py): a compiled module never silently runs
code older than its source, and the process says whether it runs compiled."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from verifier import native
from verifier.observe.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _package(tmp_path: Path, *, manifest: bool = True) -> Path:
    """A package `pkg` with one module "compiled" (an extension file beside it) and, by default, its build record."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("ANSWER = 1\n")
    (package / f"mod{SUFFIX}").write_bytes(b"")
    (package / f"_native__mypyc{SUFFIX}").write_bytes(b"")
    if manifest:
        modules = {"pkg.mod": native.source_hash(package / "mod.py"), "pkg._native__mypyc": ""}
        (package / native.MANIFEST).write_text(json.dumps({"modules": modules}))
    return package


def test_a_build_that_matches_its_sources_passes(tmp_path: Path) -> None:
    package = _package(tmp_path)
    assert native.problems(package) == []
    native.guard(package)


def test_a_source_edited_after_the_build_refuses_its_compiled_module(tmp_path: Path) -> None:
    package = _package(tmp_path)
    (package / "mod.py").write_text("ANSWER = 2\n")
    assert native.problems(package) == ["pkg/mod.py changed after it was compiled"]
    with pytest.raises(native.StaleBuild, match=r"run `python scripts/build_native.py` to compile them again"):
        native.guard(package)


def test_a_compiled_module_without_its_build_record_is_refused(tmp_path: Path) -> None:
    package = _package(tmp_path, manifest=False)
    missing = f"pkg/_native__mypyc{SUFFIX} is compiled but _native.json (its build record) is missing"
    assert native.problems(package) == [missing]


def test_a_compiled_module_the_record_does_not_list_is_refused(tmp_path: Path) -> None:
    package = _package(tmp_path)
    (package / "sub").mkdir()
    (package / "sub" / "other.py").write_text("")
    (package / "sub" / f"other{SUFFIX}").write_bytes(b"")
    assert native.problems(package) == [f"pkg/sub/other{SUFFIX} is not in _native.json"]


def test_a_removed_source_with_its_compiled_module_left_is_refused(tmp_path: Path) -> None:
    package = _package(tmp_path)
    (package / "mod.py").unlink()
    assert native.problems(package) == ["pkg/mod.py is gone but its compiled module is not"]


def test_no_compiled_module_is_pure_python(tmp_path: Path) -> None:
    package = _package(tmp_path, manifest=False)
    for path in native.extensions(package):
        path.unlink()
    assert native.problems(package) == []


def test_importing_the_package_refuses_a_stale_compiled_module(tmp_path: Path) -> None:
    """The guard runs when `verifier` is imported: a copy of the package with a compiled module its build
    record does not account for does not import, and says what to run."""
    copy = tmp_path / "verifier"
    shutil.copytree(
        ROOT / "verifier", copy, ignore=shutil.ignore_patterns("*.so", "*.pyd", native.MANIFEST, "__pycache__")
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    probe = [sys.executable, "-c", "import verifier, sys; sys.stdout.write(verifier.__file__)"]
    clean = subprocess.run(probe, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout == str(copy / "__init__.py")
    (copy / f"pipeline{SUFFIX}").write_bytes(b"")  # as if compiled from another pipeline.py
    stale = subprocess.run(probe, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert stale.returncode != 0
    assert "StaleBuild" in stale.stderr
    assert "run `python scripts/build_native.py` to compile them again" in stale.stderr


def test_the_metrics_say_whether_the_hot_path_runs_compiled() -> None:
    expected = 1.0 if native.compiled() else 0.0
    assert f"verifier_compiled {expected}" in Metrics().render().decode()


def test_a_build_in_place_compiles_every_listed_module() -> None:
    """With a build present (scripts/setup.sh makes one), every listed module is imported from its extension."""
    if not native.extensions():
        pytest.skip("no compiled build in place (pure Python)")
    assert native.problems() == []
    for name in native.MODULES:
        module = __import__(name, fromlist=["_"])
        assert not str(module.__file__).endswith(".py"), name
    assert native.compiled()
