"""Where an issuer's keys come from: discovery (per tenant of an issuer template), a JWKS file or an
inline JWKS, optionally over a pinned TLS key. The issuer section's own reader calls these.

A JWKS file is read here, when the settings are loaded: a SIGHUP reload reads it again, and a file
that is missing or holds no usable key makes the reload fail like any other bad setting (the
running workers keep the keys they have, and the error is logged).
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
from pathlib import Path
from typing import Any

from verifier.claimpath import claim_path_problem
from verifier.config.base import ConfigError, Reader, check_url, record
from verifier.config.issuer import (
    ANY_TENANT,
    DEFAULT_MAX_JWKS_BYTES,
    DEFAULT_MAX_JWKS_KEYS,
    TENANT_NAME,
    TENANT_PLACEHOLDER,
    IssuerSettings,
    template_problem,
)
from verifier.tokens.keys import KeyError_, parse_key_set

PIN_BYTES = 32  # a SHA-256 digest


def check_issuer_url(url: str, key: str, *, allow_insecure_http: bool) -> None:
    """`check_url`, for a template too: one `{tenant}` placeholder filling a whole path segment."""
    if TENANT_PLACEHOLDER in url or "{" in url:
        problem = template_problem(url)
        if problem:
            record(f"{key}: {problem}")
            return
        url = url.replace(TENANT_PLACEHOLDER, "tenant")
    check_url(url, key, allow_insecure_http=allow_insecure_http)


def read_tenants(reader: Reader) -> dict[str, Any]:
    """`tenants`: a list of tenant names, or `any`."""
    value = reader.raw("tenants")
    if value is None:
        return {"tenants": (), "any_tenant": False}
    if value == ANY_TENANT:
        return {"tenants": (), "any_tenant": True}
    if isinstance(value, str):
        reader.problem("tenants", f'expected a list of tenant names or "{ANY_TENANT}", got {value!r}')
        return {"tenants": (), "any_tenant": False}
    tenants = reader.strings("tenants")
    for i, tenant in enumerate(tenants):
        if not TENANT_NAME.match(tenant):
            reader.problem(f"tenants[{i}]", f"{tenant!r} is not a tenant name ([A-Za-z0-9._-], 1-64, no '..')")
    return {"tenants": tenants, "any_tenant": False}


def _key_set_json(document: Any, key: str) -> str:
    """The JSON text of a usable JWK Set; a problem named by `key` otherwise.

    The text is what the keys are loaded from, so it is the text that is checked: YAML gives values JSON
    has not (`kid: 2024-01-01` is a date, `1:` a number as a member name).
    """
    try:
        text = json.dumps(document, separators=(",", ":"), sort_keys=True)
        parse_key_set(json.loads(text), max_keys=DEFAULT_MAX_JWKS_KEYS)
    except (TypeError, ValueError) as exc:  # KeyError_ is a ValueError
        record(f"{key}: {exc if isinstance(exc, KeyError_) else f'not a JSON key set ({exc}); quote the value'}")
        return ""
    return text


def read_static_jwks(reader: Reader) -> dict[str, Any]:
    """`jwks_file` (read now) or `jwks_inline`: the key set as JSON text, checked to hold a usable key."""
    path = reader.raw("jwks_file")
    inline = reader.raw("jwks_inline")
    if path is not None and inline is not None:
        reader.problem("jwks_inline", "jwks_file and jwks_inline exclude each other")
        return {}
    if inline is not None:
        if not isinstance(inline, dict):
            reader.problem("jwks_inline", 'expected a JWKS object ({"keys": [...]})')
            return {"jwks_inline": ""}
        text = _key_set_json(inline, f"{reader.path}.jwks_inline")
        return {"jwks_inline": text, "static_jwks": text}
    if path is None:
        return {}
    key = f"{reader.path}.jwks_file"
    if not isinstance(path, str) or not path:
        record(f"{key}: expected a file path")
        return {"jwks_file": ""}
    try:
        with Path(path).open("rb") as fh:
            raw = fh.read(DEFAULT_MAX_JWKS_BYTES + 1)
    except OSError as exc:
        record(f"{key}: cannot read {path!r} ({exc.strerror or exc})")
        return {"jwks_file": path}
    if len(raw) > DEFAULT_MAX_JWKS_BYTES:
        record(f"{key}: {path!r} is larger than {DEFAULT_MAX_JWKS_BYTES} bytes")
        return {"jwks_file": path}
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        record(f"{key}: {path!r} is not JSON")
        return {"jwks_file": path}
    return {"jwks_file": path, "static_jwks": _key_set_json(document, key)}


def decode_pin(pin: str) -> bytes:
    """A `jwks_pin_sha256` entry: standard base64 (as `openssl ... | base64` prints it) of 32 bytes."""
    try:
        digest = base64.b64decode(pin, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{pin!r} is not base64") from None
    if len(digest) != PIN_BYTES:
        raise ConfigError(f"{pin!r} is {len(digest)} bytes, a SHA-256 digest is {PIN_BYTES}")
    return digest


def check_key_source(settings: IssuerSettings, path: str) -> None:
    """The combinations of template, tenants, key source and pins that make sense, else a problem named by key."""
    if settings.is_template:
        if not settings.tenants and not settings.any_tenant:
            record(f'{path}.tenants: required with a {TENANT_PLACEHOLDER} issuer (a list of tenants, or "any")')
        if len(settings.tenants) > settings.max_tenants:
            # They would evict each other: tokens naming them in turn (unsigned will do: keys are fetched before
            # the signature is checked) would cost the provider a discovery and a JWKS fetch each, unbounded.
            record(
                f"{path}.max_tenants: {settings.max_tenants} is fewer than the {len(settings.tenants)} tenants "
                "allowed (raise it to hold them all)"
            )
        problem = claim_path_problem(settings.tenant_claim) if settings.tenant_claim else ""
        if problem:
            record(f"{path}.tenant_claim: {problem}")
        if settings.introspection is not None or settings.introspect_jwts:
            record(f"{path}.introspection: not supported with a {TENANT_PLACEHOLDER} issuer")
        if settings.backchannel_logout is not None:
            # The receiver checks a logout token against the keys of the issuer it names, held from start-up.
            record(
                f"{path}.backchannel_logout: not supported with a {TENANT_PLACEHOLDER} issuer "
                "(configure each tenant whose logouts you receive as an issuer of its own)"
            )
        if settings.static_jwks or settings.jwks_file or settings.jwks_inline:
            record(f"{path}.jwks_file: a {TENANT_PLACEHOLDER} issuer finds each tenant's keys by discovery")
        if settings.discovery_url and TENANT_PLACEHOLDER not in settings.discovery_url:
            # One document cannot name every tenant's issuer exactly (OIDC Discovery 1.0 section 4.3).
            record(f"{path}.discovery_url: needs {TENANT_PLACEHOLDER} with a {TENANT_PLACEHOLDER} issuer")
    else:
        for key in ("tenants", "tenant_claim"):
            if getattr(settings, key) or (key == "tenants" and settings.any_tenant):
                record(f"{path}.{key}: only with a {TENANT_PLACEHOLDER} issuer template")
        for key in ("discovery_url", "jwks_uri"):
            if TENANT_PLACEHOLDER in getattr(settings, key):
                record(f"{path}.{key}: {TENANT_PLACEHOLDER} only with a {TENANT_PLACEHOLDER} issuer template")
    static = "jwks_file" if settings.jwks_file else "jwks_inline" if settings.jwks_inline else ""
    if static:
        for key in ("jwks_uri", "discovery_url", "jwks_pin_sha256", "tls_ca_file"):
            if getattr(settings, key):
                record(f"{path}.{key}: nothing is fetched with {static}")
    if (settings.jwks_pin_sha256 or settings.tls_ca_file) and settings.issuer.lower().startswith("http://"):
        key = "jwks_pin_sha256" if settings.jwks_pin_sha256 else "tls_ca_file"
        record(f"{path}.{key}: needs an https issuer (plain http has no server key to check)")
    for i, pin in enumerate(settings.jwks_pin_sha256):
        try:
            decode_pin(pin)
        except ConfigError as exc:
            record(f"{path}.jwks_pin_sha256[{i}]: {exc}")
    if settings.tls_ca_file:
        try:
            ssl.create_default_context(cafile=settings.tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            record(f"{path}.tls_ca_file: cannot load {settings.tls_ca_file!r} ({exc})")
