"""Tracing as the rest of the verifier sees it: a small protocol, and the null object used when it is off.

The OpenTelemetry implementation (`verifier.observe.otel`) is built by the composition root only when
tracing is configured; nothing else imports OpenTelemetry. When tracing is off the doors hold `None`
and branch on it once per request (no span object, no OpenTelemetry call); the fetch sites and the
audit trail, which are off the hot path, hold `NO_TRACING`.

Spans observe decisions like metrics and audit lines do: nothing flows back from them. They never
carry a token or a subject, only the door, the outcome, the reason code, the issuer and whether a
cache answered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Protocol

from verifier.decision import Decision
from verifier.observe import traceparent


class DecisionSpan(Protocol):
    """The span of one decision, from the door's first look at a request to its answer."""

    def current(self) -> AbstractContextManager[object]:
        """Makes the span the current one while inside: the parent of fetch spans, the audit line's trace."""
        ...

    def end(self, decision: Decision) -> None:
        """Records the decision's outcome, reason, status (and issuer when known) and ends the span."""
        ...


class Tracing(Protocol):
    """What doors, fetch sites and the pipeline may ask of tracing."""

    def decision(self, door: str, parent: str | None, state: str | None, cached: str | None) -> DecisionSpan:
        """A started SERVER span for one decision. `parent`/`state`: the gateway's `traceparent` and
        `tracestate` (malformed: a new trace); `cached`: the issuer of a token a cache answers for
        ("" for a remembered refusal), None when no cache knows the token."""
        ...

    def fetch(self, what: str, method: str, url: str) -> AbstractContextManager[object]:
        """A CLIENT span around one outbound call, a child of the current decision when a decision caused
        it. `what` names the call: jwks, discovery, introspection, ssf.poll; a new kind of fetch (e.g.
        logout) wraps its call the same way, `with tracing.fetch("logout", "POST", url): ...`."""
        ...

    def token_checked(self, headers: Mapping[str, str], issuer: str) -> str:
        """A token was checked now (not answered by a cache): notes `issuer` on the current decision's span (the
        pipeline passes "" for a refused token, whose `iss` is unverified); returns the trace id for its audit
        line ("" when there is no trace)."""
        ...

    def trace_id(self, headers: Mapping[str, str]) -> str:
        """The trace id of the current decision, else the one the request's `traceparent` names, else ""."""
        ...

    async def shutdown(self) -> None:
        """Exports what is queued and stops."""
        ...


_NOTHING: AbstractContextManager[object] = contextlib.nullcontext()


class NoTracing:
    """Tracing off: no spans; audit lines still name the trace a gateway's `traceparent` gave (cheap, and
    the key to finding the gateway's own spans and logs for a decision)."""

    def decision(self, door: str, parent: str | None, state: str | None, cached: str | None) -> DecisionSpan:
        """Never asked: with tracing off the doors hold no tracing at all."""
        raise NotImplementedError("tracing is off")

    def fetch(self, what: str, method: str, url: str) -> AbstractContextManager[object]:
        """No span: a shared empty context manager."""
        return _NOTHING

    def token_checked(self, headers: Mapping[str, str], issuer: str) -> str:
        """The trace id the gateway sent, if any."""
        return traceparent.trace_id(headers)

    def trace_id(self, headers: Mapping[str, str]) -> str:
        """The trace id the gateway sent, if any."""
        return traceparent.trace_id(headers)

    async def shutdown(self) -> None:
        """Nothing to export."""


NO_TRACING = NoTracing()
