"""The README's configuration reference is a valid configuration (so the docs cannot drift silently)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from verifier.settings import parse_settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_configuration_reference_validates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VERIFIER_IDP_SECRET", "s" * 32)
    monkeypatch.setenv("VERIFIER_WEBAUTHN_SECRET", "w" * 32)
    monkeypatch.setenv("VERIFIER_SSF_PUSH_AUTHORIZATION", "Bearer " + "p" * 32)
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL)
    reference = next(b for b in blocks if "issuers:" in b and "policies:" in b)
    # the files it names must be writable where it is loaded (the WebAuthn registry's directory is checked)
    reference = reference.replace("/var/lib/verifier/", f"{tmp_path}/")
    settings = parse_settings(yaml.safe_load(reference))
    assert settings.issuers[0].introspection is not None
    assert settings.policies is not None and len(settings.policies) == 4
    assert settings.edge_cache.max_age_seconds == 10
    assert settings.forward_auth.forwarded_headers == "x-forwarded" and settings.mtls_thumbprint_header == ""
    assert settings.webauthn is not None and settings.revocation is not None and settings.dpop is not None
    assert settings.admin is not None and settings.admin.address == "127.0.0.1:9002"


def test_the_readme_reference_table_is_the_schema(tmp_path: Path) -> None:
    """The table between the markers is what `python -m verifier.config.reference` prints (regenerate it)."""
    from verifier.config.reference import END, START, reference

    text = README.read_text()
    assert text.count(START) == 1 and text.count(END) == 1
    current = text[text.index(START) : text.index(END) + len(END)]
    assert current == reference(), "README.md is stale: paste `python -m verifier.config.reference` between the markers"


def test_the_reference_names_every_key_the_readers_accept() -> None:
    """Every key of the example configuration appears in the generated table (as itself or its section)."""
    from verifier.config.reference import reference

    table = reference()
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL)
    example = yaml.safe_load(next(b for b in blocks if "issuers:" in b and "policies:" in b))

    def keys(value: object, prefix: str) -> list[str]:
        if isinstance(value, dict):
            return [k for key, item in value.items() for k in keys(item, f"{prefix}{key}.")] or [prefix[:-1]]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return [k for item in value for k in keys(item, prefix[:-1] + "[].")]
        return [prefix[:-1]]

    sections = ("issuers[].introspection", "policies[]", "rate_limits")
    missing = {
        key
        for key in keys(example, "")
        if f"`{key}`" not in table and not key.endswith(".listen") and not key.startswith(sections)
    }
    assert not missing
