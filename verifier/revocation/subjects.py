"""RFC 9493 Subject Identifiers reduced to the lookup keys a token can be matched by.

Supported formats (RFC 9493 section 3.2): `iss_sub` -> (iss, sub); `email` -> the `email` claim (lower-cased, NFC,
its domain in A-labels); `opaque` -> a session id (`sid`), as the admin API and CAEP session events use it;
`aliases` -> each of its identifiers; OpenID SSF 1.0's `jwt_id` (section 3.2.1: `iss` + `jti`) -> one token, by its
issuer and `jti` (RFC 9068 section 2.2); and SSF 1.0's `complex` (section 3.3 of the SSF spec): its `session`
member for a session event, else its `user` member, else its `application` member -> the client the token was
issued to (`client_id` or `azp`, either): `opaque` names the client id (any issuer), `iss_sub` the issuer and, as
`sub`, the client id. Other formats (`phone_number`, `account`, `did`, `uri`) name nothing a token is matched by
and give no key (an event naming only such a subject is refused: `verifier.revocation.ssf.effects_of`). """

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from verifier.revocation.entry import KeyKind, SubjectKey, email_key

MAX_ALIASES = 20  # identifiers in one `aliases` subject; more is an abuse, not an account
MAX_IDENTIFIER_CHARS = 512  # characters in one identifier value


class SubjectError(ValueError):
    """A subject identifier that is malformed (not one that is merely unsupported)."""


def _member(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value or len(value) > MAX_IDENTIFIER_CHARS:
        raise SubjectError(f"subject format {data.get('format')!r} needs a string {name!r}")
    return value


def subject_keys(identifier: Any, *, session: bool = False, depth: int = 0) -> tuple[SubjectKey, ...]:
    """The lookup keys of one subject identifier; () for a supported-by-nobody format.

    `session` says the event is about a session: a `complex` subject's `session` member wins.
    Raises `SubjectError` when the identifier is not an RFC 9493 identifier at all.
    """
    if not isinstance(identifier, Mapping):
        raise SubjectError("subject identifier is not an object")
    fmt = identifier.get("format")
    if fmt == "iss_sub":
        return (SubjectKey(KeyKind.ISS_SUB, _member(identifier, "sub"), _member(identifier, "iss")),)
    if fmt == "email":
        return (SubjectKey(KeyKind.EMAIL, email_key(_member(identifier, "email"))),)
    if fmt == "opaque":
        return (SubjectKey(KeyKind.SID, _member(identifier, "id")),)
    if fmt == "jwt_id":
        return (SubjectKey(KeyKind.JTI, _member(identifier, "jti"), _member(identifier, "iss")),)
    if fmt in ("aliases", "complex") and depth > 0:  # RFC 9493 section 3.2.7, SSF 1.0 section 3.3: they do not nest
        raise SubjectError(f"a {fmt!r} subject inside another subject")
    if fmt == "aliases":
        aliases = identifier.get("identifiers")
        if not isinstance(aliases, list) or not aliases or len(aliases) > MAX_ALIASES:
            raise SubjectError("aliases subject needs a non-empty list of identifiers")
        keys: list[SubjectKey] = []
        for alias in aliases:
            keys.extend(subject_keys(alias, session=session, depth=1))
        return tuple(dict.fromkeys(keys))
    if fmt == "complex":
        for name, value in identifier.items():
            if name != "format" and not isinstance(value, Mapping):  # each member is a subject identifier
                raise SubjectError(f"complex subject member {str(name)[:40]!r} is not a subject identifier")
        members = [m for m in ("session", "user") if m in identifier]
        if not members:
            # A client alone (a service's client-credentials tokens have no user); beside a user or a session the
            # event is about them, as before.
            return _application_keys(identifier["application"]) if "application" in identifier else ()
        chosen = "session" if session and "session" in members else ("user" if "user" in members else "session")
        return subject_keys(identifier[chosen], session=session, depth=1)
    if not isinstance(fmt, str) or not fmt:
        raise SubjectError("subject identifier has no format")
    return ()


def _application_keys(member: Mapping[str, Any]) -> tuple[SubjectKey, ...]:
    """A `complex` subject's `application` member: the client an `opaque` id names (any issuer), or the client an
    `iss_sub` names (its `sub`) at that issuer; () for a format that names no client id."""
    fmt = member.get("format")
    if fmt == "opaque":
        return (SubjectKey(KeyKind.CLIENT, _member(member, "id")),)
    if fmt == "iss_sub":
        return (SubjectKey(KeyKind.CLIENT, _member(member, "sub"), _member(member, "iss")),)
    if fmt in ("aliases", "complex"):
        raise SubjectError(f"a {fmt!r} subject inside another subject")
    if not isinstance(fmt, str) or not fmt:
        raise SubjectError("subject identifier has no format")
    return ()


def session_user_keys(identifier: Any) -> tuple[SubjectKey, ...]:
    """For a session event: the keys of the user a `complex` subject names beside its session, else ().

    A token that carries no `sid` cannot be tied to the session; the user's keys let the event reach it, as
    Back-Channel Logout 1.0 does for a logout token naming both `sid` and `sub`. A malformed `user` member
    gives none: the session is revoked either way.
    """
    if not isinstance(identifier, Mapping) or identifier.get("format") != "complex":
        return ()
    if "session" not in identifier or "user" not in identifier:
        return ()
    try:
        keys = subject_keys(identifier["user"], depth=1)
    except SubjectError:
        return ()
    return tuple(k for k in keys if k.kind is not KeyKind.SID)
