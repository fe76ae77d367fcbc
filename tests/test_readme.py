"""The README's configuration reference is a valid configuration (so the docs cannot drift silently)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from verifier.settings import parse_settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_configuration_reference_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERIFIER_IDP_SECRET", "s" * 32)
    monkeypatch.setenv("VERIFIER_WEBAUTHN_SECRET", "w" * 32)
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL)
    reference = next(b for b in blocks if "issuers:" in b and "policies:" in b)
    settings = parse_settings(yaml.safe_load(reference))
    assert settings.issuers[0].introspection is not None
    assert settings.policies is not None and len(settings.policies) == 4
    assert settings.edge_cache.max_age_seconds == 10
    assert settings.forward_auth.forwarded_headers == "x-forwarded" and settings.mtls_thumbprint_header == ""
    assert settings.webauthn is not None and settings.revocation is not None and settings.dpop is not None
