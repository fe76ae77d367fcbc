"""Finding the external programs a test needs: skipped where a developer lacks one, a failure on CI."""

from __future__ import annotations

import os
import shutil

import pytest


def require(name: str, installed_by: str) -> str:
    """The path of `name`; on CI (where `installed_by` must have installed it) its absence fails the test."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: {installed_by} installs it")
        pytest.skip(f"{name} not installed ({installed_by} installs it)")
    return found
