"""A path-prefix reverse proxy: several OpenID Providers as the tenants of one host.

Multi-tenant providers (Entra, Keycloak realms, Auth0/Okta custom domains) serve every tenant from
one scheme://host:port, the tenant in the path: ``http://127.0.0.1:<proxy>/tenant-a`` is one
node-oidc-provider, ``.../tenant-b`` another. The first path segment picks the backend; the Host
header and the whole path go through unchanged (each provider answers under its own path, see
``server.js``). Every request is counted by its first path segment, tenants that have no backend
included, so a test can prove how many requests a flood of made-up tenant names caused.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import threading
from types import TracebackType

from support import free_port

HTTP_TIMEOUT_S = 10.0
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"})


class TenantProxy:
    """Routes ``/<tenant>/...`` to the backend port registered for that tenant; 404 for the others."""

    def __init__(self) -> None:
        self.port = free_port()
        self.backends: dict[str, int] = {}
        self.requests: collections.Counter[str] = collections.Counter()  # first path segment -> requests
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:<port>``: the one host every tenant shares."""
        return f"http://127.0.0.1:{self.port}"

    def issuer(self, tenant: str) -> str:
        """The issuer URL of `tenant` behind this proxy."""
        return f"{self.origin}/{tenant}"

    def count(self, tenant: str | None = None) -> int:
        """Requests seen for `tenant` (every request when None), answered or not."""
        with self._lock:
            return sum(self.requests.values()) if tenant is None else self.requests[tenant]

    def reset(self) -> None:
        """Zero the counts."""
        with self._lock:
            self.requests.clear()

    def __enter__(self) -> TenantProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                tenant = self.path.split("?", 1)[0].lstrip("/").split("/", 1)[0]
                with proxy._lock:
                    proxy.requests[tenant] += 1
                    port = proxy.backends.get(tenant)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                if port is None:
                    self._answer(404, {"content-type": "application/json"}, b'{"error":"no such tenant"}')
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                upstream = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    out = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
                    self._answer(response.status, out, data)
                except OSError:  # the backend is not (yet, or any more) listening
                    self._answer(502, {"content-type": "application/json"}, b'{"error":"backend down"}')
                finally:
                    upstream.close()

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
