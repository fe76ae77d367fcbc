"""The compiled hot path: which modules `scripts/build_native.py` compiles with mypyc, and the guard that a
compiled module never runs code older than its source.

A first-seen token's check runs door -> pipeline -> authenticator -> JWT -> answer -> audit as Python
layers; between two signature checks, the interpreter's own code evicts OpenSSL's from the instruction
cache (docs/BENCHMARKS.md, "First-seen ES256, fifth pass"). `python scripts/build_native.py` compiles the
modules in `MODULES` into one extension group (calls between them are C calls), in place: each module's
extension sits beside its `.py`, which Python then imports instead. Without a build (or after
`python scripts/build_native.py --clean`) the same modules run as Python: behaviour is the same either way.

The build writes `MANIFEST`: the SHA-256 of every compiled module's source. `guard()` runs when the package
is imported (`verifier/__init__.py`) and refuses to go on, naming the command to run, when any extension
module in the package does not match its source as built (edited since, or built elsewhere): a compiled
module must never silently run older code than the `.py` beside it.

Imports nothing from `verifier` (it runs inside the package's `__init__`, and the build script loads it
by path).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
from pathlib import Path

# One group, so that calls between them are native. What a first-seen forward-auth check runs through
# (`python -m bench.inproc --first-seen --profile`).
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
    # A first-seen opaque token's RFC 7662 call (`python -m bench.inproc --opaque --profile`).
    "verifier.tokens.introspection",
    "verifier.tokens.introspection_client",
    "verifier.tokens.introspection_http",
    "verifier.tokens.introspection_breaker",
)
GROUP = "verifier._native"  # the shared library's module: verifier/_native__mypyc.<suffix>
PACKAGE = Path(__file__).resolve().parent
MANIFEST = "_native.json"  # in the package directory, beside the extensions
BUILD = "python scripts/build_native.py"
CLEAN = "python scripts/build_native.py --clean"


class StaleBuild(ImportError):
    """An extension module in the package that does not match its source as built."""


def source_path(module: str, package: Path = PACKAGE) -> Path:
    """The `.py` of one of `MODULES`."""
    return package.parent.joinpath(*module.split(".")).with_suffix(".py")


def source_hash(path: Path) -> str:
    """The SHA-256 of a source file (hex)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extensions(package: Path = PACKAGE) -> list[Path]:
    """The extension modules this interpreter would import from the package (its own suffixes only)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = []
    for folder, _, names in os.walk(package):
        found += [Path(folder, name) for name in names if name.endswith(suffixes)]
    return sorted(found)


def _module_of(extension: Path, package: Path) -> str:
    name = extension.name
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return ".".join((*extension.parent.relative_to(package.parent).parts, name))


def read_manifest(package: Path = PACKAGE) -> dict[str, str] | None:
    """Module -> source SHA-256 as built (the group's library maps to ""), or None when there is none."""
    try:
        data = json.loads((package / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: every extension is then unaccounted for
    modules = data.get("modules") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in modules.items()} if isinstance(modules, dict) else {}


def problems(package: Path = PACKAGE) -> list[str]:
    """Why the extensions in the package cannot be trusted to run their sources (empty: they can, or none)."""
    found = extensions(package)
    if not found:
        return []
    manifest = read_manifest(package)
    if manifest is None:
        return [f"{found[0].relative_to(package.parent)} is compiled but {MANIFEST} (its build record) is missing"]
    wrong = []
    for extension in found:
        module = _module_of(extension, package)
        built = manifest.get(module)
        if built is None:
            wrong.append(f"{extension.relative_to(package.parent)} is not in {MANIFEST}")
        elif built:  # the group's library has no source of its own
            source = source_path(module, package)
            if not source.exists():
                wrong.append(f"{source.relative_to(package.parent)} is gone but its compiled module is not")
            elif source_hash(source) != built:
                wrong.append(f"{source.relative_to(package.parent)} changed after it was compiled")
    return wrong


def guard(package: Path = PACKAGE) -> None:
    """Raises `StaleBuild`, with the command to run, when a compiled module would run other code than its source."""
    wrong = problems(package)
    if wrong:
        raise StaleBuild(
            "verifier: the compiled modules do not match their sources ("
            + "; ".join(wrong[:3])
            + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
            + f"): run `{BUILD}` to compile them again, or `{CLEAN}` to run pure Python"
        )


def compiled() -> bool:
    """Whether this process runs the compiled hot path (`verifier.pipeline` imported from its extension)."""
    spec = importlib.util.find_spec("verifier.pipeline")  # the loaded module's own spec once imported
    return spec is not None and str(spec.origin).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
