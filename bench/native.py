"""The first-seen hot path compiled with mypyc, for ``python -m bench.inproc --pure-vs-compiled N`` (#24 goal 2).

``build(tree)`` compiles ``MODULES`` of the ``verifier/`` in ``tree`` (a copy: the working tree is never
touched) as one mypyc group, so calls between them are C calls; each extension lands beside its ``.py``,
which Python then imports instead. Needs mypy (mypyc ships in it: the dev extra), gcc and the Python
headers. Measured, not shipped: docs/BENCHMARKS.md, "First-seen ES256, fifth pass: compiled with mypyc".
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import os
import shutil
import time
from pathlib import Path

# What a first-seen forward-auth check runs through (`python -m bench.inproc --first-seen --profile`),
# less the modules a test monkeypatches across (tokens/keys, tokens/jwks), those whose classes tests
# subclass or replace with stand-ins (checks/*, decision's `__dict__` initialisation) and errors (a metaclass).
MODULES = (
    "verifier.doors.forward_auth",
    "verifier.doors.answer_memo",
    "verifier.doors.admission",
    "verifier.request",
    "verifier.pipeline",
    "verifier.credentials",
    "verifier.authenticators",
    "verifier.principal",
    "verifier.tokens.jwt",
    "verifier.tokens.jws",
    "verifier.tokens.cache",
    "verifier.observe.audit",
    # A first-seen opaque token's RFC 7662 call (`python -m bench.inproc --opaque --profile`; #24 goal 7).
    "verifier.tokens.introspection",
    "verifier.tokens.introspection_client",
    "verifier.tokens.introspection_http",
    "verifier.tokens.introspection_breaker",
    # The deadlines of both (`Timed`): a compiled class deriving from an interpreted one that declares `__slots__`
    # fails at import ("mypyc classes can't have __slots__").
    "verifier.sweep",
)
GROUP = "verifier._native"  # the shared library's module: verifier/_native__mypyc.<suffix>


def build(tree: Path) -> float:
    """Compiles `MODULES` in ``tree`` (holding ``verifier/`` and the project's ``pyproject.toml``: mypy's
    settings) in place; returns the seconds it took."""
    from mypyc.build import mypycify
    from setuptools import setup

    started = time.monotonic()
    here = Path.cwd()
    os.chdir(tree)  # the extensions land at their modules' paths relative to here
    try:
        extensions = mypycify(
            [str(Path(*m.split(".")).with_suffix(".py")) for m in MODULES],
            group_name=GROUP,
            opt_level="3",
            target_dir="build",
        )
        with contextlib.redirect_stdout(io.StringIO()):
            setup(
                name="verifier-native",
                packages=[],
                py_modules=[],
                ext_modules=extensions,
                script_args=["-q", "build_ext", "--inplace", "--parallel", str(os.cpu_count() or 1)],
            )
    finally:
        os.chdir(here)
    shutil.rmtree(tree / "build", ignore_errors=True)
    missing = [m for m in MODULES if not compiled_in(tree, m)]
    if missing:
        raise SystemExit(f"bench.native: not compiled: {', '.join(missing)}")
    return time.monotonic() - started


def compiled_in(tree: Path, module: str) -> bool:
    """Whether ``tree`` holds an extension for ``module`` (for this interpreter)."""
    base = tree.joinpath(*module.split("."))
    return any(base.with_name(base.name + s).exists() for s in importlib.machinery.EXTENSION_SUFFIXES)


def running_compiled() -> bool:
    """Whether this process imports the compiled `verifier.pipeline`."""
    spec = importlib.util.find_spec("verifier.pipeline")
    return spec is not None and str(spec.origin).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
