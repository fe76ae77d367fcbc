"""RFC 9728 section 3: `GET /.well-known/oauth-protected-resource[/<path>]`, the resources' metadata.

Served without authentication (discovery is how a client learns where to get a token) on the
forward-auth listener; a gateway passes these paths to the verifier as they are (deploy/). Each
document's `resource` is the identifier whose well-known URL it is served at (section 3.3 requires
a client to check exactly that). Two resources on different hosts may share a path: the request's
`Host` picks one, and a host that names neither gets 404; the document itself never echoes the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from verifier.doors.routes import Handler, HttpAnswer, HttpRequest, Router
from verifier.policy.metadata import ResourceMetadata, metadata_path
from verifier.request import host_name, normalize_host


def _host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def _handler(found: list[ResourceMetadata], cache_control: str) -> Handler:
    """The handler for one metadata path."""

    async def metadata(request: HttpRequest, _: Mapping[str, str]) -> HttpAnswer:
        """The one resource at this path, or the one on the request's host when several share it."""
        chosen = found
        if len(found) > 1:
            host = host_name(normalize_host(request.headers.get("host", "")))
            chosen = [d for d in found if _host_of(d.resource) == host]
            if not chosen:
                return HttpAnswer.json(404, {"error": "not_found"})
        return HttpAnswer(200, (("content-type", "application/json"), ("cache-control", cache_control)), chosen[0].body)

    return metadata


def add_metadata_routes(router: Router, documents: Sequence[ResourceMetadata], *, max_age: int) -> None:
    """One `GET` route per metadata path; each answers JSON with `Cache-Control: public, max-age`."""
    by_path: dict[str, list[ResourceMetadata]] = {}
    for document in documents:
        by_path.setdefault(metadata_path(document.resource), []).append(document)
    cache_control = f"public, max-age={max_age}" if max_age else "no-cache"
    for path, found in by_path.items():
        router.add("GET", path, _handler(found, cache_control))
