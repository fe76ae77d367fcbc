"""The README's two commands on a stock Debian: scripts/venv.sh makes and uses the project venv.

Debian 12/13 mark their python3 "externally managed" (PEP 668): `pip install` into it stops with
`error: externally-managed-environment`. These tests run scripts/venv.sh against that real interpreter
(/usr/bin/python3 with its EXTERNALLY-MANAGED marker, PATH without any other Python) and check that
everything after it (python, python3, pip, $PYTHON) is the venv's and that pip installs there.
"""

from __future__ import annotations

import os
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")
DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _externally_managed() -> bool:
    if not SYSTEM_PYTHON.exists():
        return False
    stdlib = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return (Path(stdlib) / "EXTERNALLY-MANAGED").exists()


needs_debian_python = pytest.mark.skipif(
    not _externally_managed(), reason="needs a distribution python3 marked EXTERNALLY-MANAGED (PEP 668) at /usr/bin"
)

PROBE = """
set -euo pipefail
. "$REPO/scripts/venv.sh"
command -v python python3 pip
echo "PYTHON=$PYTHON"
python -c 'import sys; print("prefix=" + sys.prefix)'
python -m pip install --disable-pip-version-check -q --no-index "$WHEEL"
python -c 'import tiny_probe; print("imported " + tiny_probe.WHERE)'
"""


def _wheel(directory: Path) -> Path:
    """A one-module wheel made here (no build step, no index): what pip must agree to install into the venv."""
    wheel = directory / "tiny_probe-0.1-py3-none-any.whl"
    files = {
        "tiny_probe.py": "WHERE = 'venv'\n",
        "tiny_probe-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: tiny-probe\nVersion: 0.1\n",
        "tiny_probe-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{name},," for name in files] + ["tiny_probe-0.1.dist-info/RECORD,,"]
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr("tiny_probe-0.1.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


def _run(script: str, cwd: Path, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "HOME": os.environ.get("HOME", "/root"),
            "PATH": path,
            "REPO": str(REPO),
            "WHEEL": str(_wheel(cwd)),
            **env,
        },
    )


@needs_debian_python
def test_the_system_python_refuses_pip_as_debian_does(tmp_path: Path) -> None:
    """The premise: the interpreter the scripts meet on Debian refuses pip installs."""
    result = _run("python3 -m pip install --no-index --dry-run six", tmp_path, DEBIAN_PATH)
    assert result.returncode != 0
    assert "externally-managed-environment" in result.stdout + result.stderr


@needs_debian_python
def test_venv_sh_creates_and_uses_the_project_venv(tmp_path: Path) -> None:
    result = _run(PROBE, tmp_path, DEBIAN_PATH)
    assert result.returncode == 0, result.stderr
    venv = tmp_path / ".venv"
    lines = result.stdout.splitlines()
    which = [line for line in lines if line.startswith("/")]
    assert which[:3] == [str(venv / "bin" / name) for name in ("python", "python3", "pip")]
    assert f"PYTHON={venv}/bin/python" in lines
    assert f"prefix={venv}" in lines
    assert "imported venv" in lines
    again = _run(PROBE, tmp_path, DEBIAN_PATH)  # the second run reuses it
    assert again.returncode == 0 and "creating" not in again.stdout


@needs_debian_python
def test_venv_sh_installs_python3_venv_when_ensurepip_is_missing(tmp_path: Path) -> None:
    """Debian ships ensurepip in python3-venv; without it `python3 -m venv` fails. As root the script installs it.

    Simulated: a python3 whose ensurepip is hidden until a stand-in apt-get "installs" python3-venv.
    """
    fake = tmp_path / "bin"
    hide = tmp_path / "hide"
    (hide / "ensurepip").mkdir(parents=True)
    (hide / "ensurepip" / "__init__.py").write_text("raise ImportError('ensurepip is in python3-venv')\n")
    fake.mkdir()
    (fake / "python3").write_text(f'#!/bin/sh\nPYTHONPATH={hide} exec {SYSTEM_PYTHON} "$@"\n')
    log = tmp_path / "apt.log"
    (fake / "apt-get").write_text(
        f'#!/bin/sh\necho "$@" >> {log}\ncase "$*" in *"install"*python3-venv*) rm -rf {hide} ;; esac\n'
    )
    for name in ("python3", "apt-get"):
        (fake / name).chmod(0o755)
    project = tmp_path / "project"
    project.mkdir()
    result = _run(PROBE, project, f"{fake}:{DEBIAN_PATH}")
    if os.geteuid() != 0:
        assert result.returncode != 0 and "apt-get install python3-venv" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("update") and "install" in calls[1] and "python3-venv" in calls[1]
    assert f"prefix={project / '.venv'}" in result.stdout


def test_the_scripts_use_the_venv_for_everything() -> None:
    """dev.sh, test.sh and setup.sh source venv.sh before running any Python; nothing calls a bare python3 -m pip."""
    for name in ("dev.sh", "test.sh", "setup.sh"):
        text = (REPO / "scripts" / name).read_text()
        assert ". scripts/venv.sh" in text, name
        code = [line for line in text.split(". scripts/venv.sh", 1)[0].splitlines() if not line.startswith("#")]
        assert not any("python" in line for line in code), name
    assert ".venv/" in (REPO / ".gitignore").read_text().splitlines()
    for script in sorted((REPO / ".ci" / "setup.d").glob("*.sh")):
        text = script.read_text()
        assert not re.search(r"^\s*[^#\n]*\bpython3? -(m|c)\b", text, re.M), f"{script.name}: use \"$PY\" (the venv's)"
