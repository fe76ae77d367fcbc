"""The config reader every section shares: problems named by key, collected, with a nearest-key hint.

Nothing here imports the rest of the verifier: settings sections (`verifier.config.*`) and
`verifier.settings` build on it, services import the typed sections, never the other way round.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import ipaddress
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


class ConfigError(ValueError):
    """A settings file is invalid; the message names the key."""



class Reader:
    """Reads one mapping, remembering its path for error messages and refusing unknown keys.

    Inside `parse_settings` a problem is recorded and reading goes on with the key's default (or an
    empty value), so one run of `check-config` names every problem, not only the first; an unknown key
    is named with the nearest known one. Outside it, the first problem raises.
    """

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
        self.data: Mapping[str, Any] = data
        self.path = path
        self.seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str, message: str) -> None:
        """Records (or, outside `parse_settings`, raises) a problem with `key`."""
        record(f"{self._key(key)}: {message}")

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return key in self.data

    def text(self, key: str, default: str | None = None) -> str:
        value = self.raw(key)
        if value is None:
            if default is None:
                self.problem(key, "required")
                return ""
            return default
        if not isinstance(value, str) or not value:
            self.problem(key, "expected a non-empty string")
            return default or ""
        return value

    def number(self, key: str, default: float, *, minimum: float = 0, maximum: float | None = None) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.problem(key, "expected a finite number")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            self.problem(key, f"{value} is outside [{minimum}, {maximum}]")
            return default
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, "expected an integer")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            self.problem(key, f"{value} is outside [{minimum}, {maximum}]")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(key, "expected true or false")
            return default
        return value

    def strings(self, key: str, *, required: bool = True) -> tuple[str, ...]:
        value = self.raw(key)
        if value is None and not required:
            return ()
        if not isinstance(value, Sequence) or isinstance(value, str) or (required and not value):
            self.problem(key, "expected a non-empty list of strings")
            return ()
        bad = [i for i, item in enumerate(value) if not isinstance(item, str) or not item]
        for i in bad:
            self.problem(f"{key}[{i}]", "expected a non-empty string")
        return () if bad else tuple(value)

    def child(self, key: str) -> Reader | None:
        value = self.raw(key)
        if value is None:
            return None
        try:
            return Reader(value, self._key(key))
        except ConfigError as exc:
            record(str(exc))
            return None

    def children(self, key: str) -> list[Reader]:
        value = self.raw(key)
        if not isinstance(value, Sequence) or isinstance(value, str) or not value:
            self.problem(key, "expected a non-empty list")
            return []
        readers = []
        for i, item in enumerate(value):
            try:
                readers.append(Reader(item, f"{self._key(key)}[{i}]"))
            except ConfigError as exc:
                record(str(exc))
        return readers

    def done(self) -> None:
        for key in sorted((set(self.data) - self.seen), key=str):
            near = nearest(str(key), self.seen)
            self.problem(str(key), f"unknown key (did you mean {near}?)" if near else "unknown key")


def nearest(key: str, known: set[str]) -> str | None:
    """The known key `key` was most likely meant to be (a typo of it, or of its first word), or None."""
    best, score = None, 0.0
    for candidate in sorted(known):
        ratio = max(
            difflib.SequenceMatcher(None, key, candidate).ratio(),
            difflib.SequenceMatcher(None, key, candidate.split("_", 1)[0]).ratio() - 0.1,
        )
        if ratio > score:
            best, score = candidate, ratio
    return best if score >= 0.6 else None


# The problems found so far by the `parse_settings` call in progress (None: raise at the first one).
_problems: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("config_problems", default=None)


def record(message: str) -> None:
    problems = _problems.get()
    if problems is None:
        raise ConfigError(message)
    key = message.split(":", 1)[0]
    if not any(p.split(":", 1)[0] == key for p in problems):  # the first problem with a key says enough
        problems.append(message)


def collecting(parse: Callable[[Any], T], data: Any) -> T:
    """Runs `parse` recording every problem; raises one `ConfigError` listing them all, one a line."""
    problems: list[str] = []
    token = _problems.set(problems)
    try:
        settings = parse(data)
    except ConfigError as exc:  # a check that cannot go on: it ends the run, after what was recorded
        key = str(exc).split(":", 1)[0]
        if not any(p.split(":", 1)[0] == key for p in problems):
            problems.append(str(exc))
    except Exception:
        if not problems:
            raise
        # an earlier problem left a value the later code could not use: the problems already say why
    finally:
        _problems.reset(token)
    if problems:
        raise ConfigError("\n".join(problems))
    return settings



def header_secret_problem(value: str) -> str:
    """What keeps a configured secret compared with an HTTP header from ever matching one (never quoting it), or "".

    The doors read a header's bytes as Latin-1 and without its surrounding white space (RFC 9110 section 5.5: field
    values are ASCII in practice): a UTF-8 `é` configured is the bytes C3 A9, presented it reads as `Ã©`; a trailing
    newline or a control character is never presented. Such a secret is refused at start, not discovered at the
    first request it turns away."""
    if value != value.strip():
        return "surrounding white space (a trailing newline?) is not part of a presented header; remove it"
    if not (value.isascii() and value.isprintable()):
        return "must be printable ASCII (an HTTP header carries it; a non-ASCII or control character never matches)"
    return ""


def is_loopback_host(host: str) -> bool:
    """Whether `host` names this machine: the only place plain http is allowed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, key: str, what: str = "issuer", *, allow_insecure_http: bool = False) -> None:
    """An http(s) URL, https unless loopback and allowed; a `ConfigError` naming `key` (recorded in `parse_settings`).

    Keys, SETs and client secrets that travel over plain HTTP can be swapped or read by anyone on
    the path, so every outbound URL in the config goes through this one check. Plain http on loopback
    is trusted by address only when the config says so (`allow_insecure_http: true`, for tests and
    local labs; `verifier dev` builds its settings itself).
    """
    problem = url_problem(url, what)
    if problem:
        record(f"{key}: {problem}")
    elif not allow_insecure_http and url.lower().startswith("http://"):
        record(f"{key}: plain http needs allow_insecure_http: true (tests and local labs only; {url!r})")


def url_problem(url: object, what: str = "issuer", *, allow_http: bool = True) -> str:
    """Why `url` must not be called (empty: it may): http(s), parseable, https unless loopback.

    `allow_http=False` refuses plain http even on loopback: a URL learned from an https issuer's
    metadata must not downgrade (see `verifier.tokens.fetch.check_learned_url`).
    """
    if not isinstance(url, str):
        return f"expected an http(s) URL, got {type(url).__name__}"
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        return f"not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not hostname:
        return f"expected an http(s) URL, got {url!r}"
    if parts.scheme == "http" and not (allow_http and is_loopback_host(hostname)):
        return f"https is required for a non-loopback {what} ({url!r})" if allow_http else f"plain http ({url!r})"
    return ""



@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """What the schema says about one key: the line of the reference, the bounds the reader enforces."""

    doc: str
    minimum: float | None = None  # numbers: the smallest accepted value (0 when None)
    maximum: float | None = None  # numbers: the largest accepted value (unbounded when None)
    unit: str = ""  # e.g. seconds, bytes, entries
    choices: tuple[str, ...] = ()  # strings: the accepted values
    key: str = ""  # the key's path in its section when it is not the field's name (read by the section)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    minimum: float | None = None,
    maximum: float | None = None,
    unit: str = "",
    choices: tuple[str, ...] = (),
    key: str = "",
) -> Any:
    """A dataclass field that is a config key: its default, bounds, unit and one-line doc, declared once."""
    meta = Setting(doc=doc, minimum=minimum, maximum=maximum, unit=unit, choices=choices, key=key)
    return dataclasses.field(default=default, metadata={"setting": meta})


def setting_of(field: dataclasses.Field[Any]) -> Setting | None:
    """The field's `Setting`, or None when it is not read from a key of its own."""
    meta = field.metadata.get("setting")
    return meta if isinstance(meta, Setting) else None


def read_fields(reader: Reader, cls: type[Any], **given: Any) -> dict[str, Any]:
    """Reads every `setting` field of the dataclass `cls` from `reader`, as the schema says; `given`
    fields (read by a section's own code) are passed through. Problems are recorded by key."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        meta = setting_of(field)
        if meta is None or field.name in given:
            continue
        values[field.name] = _read_value(reader, field.name, hints[field.name], field.default, meta)
    return {**values, **given}


def _read_value(reader: Reader, key: str, hint: Any, default: Any, meta: Setting) -> Any:
    required = default is dataclasses.MISSING
    if hint is bool:
        return reader.boolean(key, default)
    if hint is int:
        return reader.integer(key, default, minimum=int(meta.minimum or 0), maximum=_int_or_none(meta.maximum))
    if hint is float:
        return reader.number(key, default, minimum=meta.minimum or 0, maximum=meta.maximum)
    if hint is str:
        value = reader.text(key, None if required else default)
        if meta.choices and value and value not in meta.choices:
            reader.problem(key, f"expected one of {', '.join(meta.choices)}, got {value!r}")
            return default if not required else meta.choices[0]
        return value
    if hint == str | None:  # optional, no default: absent is None, present must be a non-empty string
        return None if reader.raw(key) is None else reader.text(key)
    if hint == int | None:  # optional bound: absent is None, present must be an integer within bounds
        if reader.raw(key) is None:
            return None
        return reader.integer(key, 0, minimum=int(meta.minimum or 0), maximum=_int_or_none(meta.maximum))
    if hint == tuple[str, ...]:
        if not required and reader.raw(key) is None:
            return default
        return reader.strings(key, required=required)
    raise TypeError(f"{key}: no reader for {hint!r}")  # a schema mistake, caught by the tests


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)
