"""Compiles the verifier's hot path with mypyc, in place (which modules and why: verifier/native.py).

    python scripts/build_native.py           # compile; nothing to do when the build matches the sources
    python scripts/build_native.py --clean   # remove the compiled modules: the package runs pure Python
    python scripts/build_native.py --status  # say whether the package runs compiled; exit 1 when it does not

Needs mypy (mypyc ships in it: the dev extra), a C compiler and the Python headers (Debian: gcc,
python3-dev). Each module's extension is written beside its `.py` (gitignored), the group's shared library as
`verifier/_native__mypyc.<suffix>`, and `verifier/_native.json` records the SHA-256 of every compiled source:
importing `verifier` refuses to run an extension whose source changed since (`verifier.native.guard`).
A failed build leaves no extension behind (pure Python, and this script exits 1).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "build" / "native"  # the generated C and the objects (build/ is gitignored)


def _native() -> ModuleType:
    """verifier/native.py loaded by path: importing the package would run the guard this script repairs."""
    spec = importlib.util.spec_from_file_location("_verifier_native", ROOT / "verifier" / "native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean(native: ModuleType) -> int:
    """Removes every extension module in the package and the manifest; how many files went."""
    removed = native.extensions()
    for path in removed:
        path.unlink()
    manifest = native.PACKAGE / native.MANIFEST
    if manifest.exists():
        manifest.unlink()
    return len(removed)


def current(native: ModuleType) -> bool:
    """Whether the package holds a build of exactly `MODULES` that matches their sources."""
    manifest = native.read_manifest()
    return (
        bool(manifest)
        and not native.problems()
        and set(manifest) == {*native.MODULES, native.GROUP + "__mypyc"}
        and len(native.extensions()) == len(native.MODULES) + 1
    )


def build(native: ModuleType) -> None:
    """Compiles `MODULES` as one group, in place, and writes the manifest."""
    from mypyc.build import mypycify
    from setuptools import setup

    sources = {module: native.source_path(module) for module in native.MODULES}
    hashes = {module: native.source_hash(path) for module, path in sources.items()}
    os.chdir(ROOT)  # the extensions land at their modules' paths relative to here
    extensions = mypycify(
        [str(path.relative_to(ROOT)) for path in sources.values()],
        group_name=native.GROUP,
        opt_level="3",
        target_dir=str(TARGET.relative_to(ROOT)),
    )
    jobs = str(os.cpu_count() or 1)
    setup(
        name="verifier-native",
        packages=[],
        py_modules=[],
        ext_modules=extensions,
        script_args=["-q", "build_ext", "--inplace", "--parallel", jobs, "--build-temp", str(TARGET / "temp")],
    )
    if {module: native.source_hash(path) for module, path in sources.items()} != hashes:
        raise SystemExit("build_native: a source changed during the build; run it again")
    import mypy.version

    record = {
        "mypy": mypy.version.__version__,
        "python": sys.version.split()[0],
        "modules": {**hashes, native.GROUP + "__mypyc": ""},
    }
    (native.PACKAGE / native.MANIFEST).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python scripts/build_native.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", action="store_true", help="remove the compiled modules (pure Python)")
    parser.add_argument("--status", action="store_true", help="exit 1 unless the package runs compiled")
    parser.add_argument("--force", action="store_true", help="compile even when the build is current")
    args = parser.parse_args()
    native = _native()
    if args.clean:
        print(f"build_native: removed {clean(native)} compiled modules (pure Python)")
        return
    if args.status:
        ok = current(native)
        print("build_native: " + ("compiled, current" if ok else "pure Python (or a stale build)"))
        raise SystemExit(0 if ok else 1)
    if not args.force and current(native):
        print(f"build_native: {len(native.MODULES)} modules compiled and current, nothing to do")
        return
    clean(native)
    started = time.monotonic()
    try:
        build(native)
    except BaseException:
        clean(native)  # never half a build: pure Python
        raise
    finally:
        shutil.rmtree(ROOT / "build" / "lib", ignore_errors=True)
    if not current(native):
        clean(native)
        raise SystemExit("build_native: the build did not produce every module; removed it (pure Python)")
    print(f"build_native: compiled {len(native.MODULES)} modules in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
