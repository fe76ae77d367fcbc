"""The composition root: builds every part once from `Settings`, starts the doors, stops them.

Dependencies and the clock come in through constructors; nothing else in the package creates
caches, clients or verifiers of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import ssl
from collections.abc import Callable

import aiohttp
from aiohttp import web

from verifier.authenticators import Authenticator, JwtAuthenticator, OpaqueIntrospection
from verifier.binding.dpop import DpopVerifier
from verifier.checks.base import Check
from verifier.checks.certificate import CertificateBinding
from verifier.checks.dpop import DpopBinding
from verifier.checks.introspect_jwts import IntrospectJwts
from verifier.checks.policy import RoutePolicy
from verifier.checks.rate_limit import RateLimit
from verifier.checks.revocation import Revocation
from verifier.checks.step_up import WebAuthnStepUp
from verifier.checks.trust import RouteTrust
from verifier.clock import Clock, SystemClock
from verifier.config.dpop import DpopConfig
from verifier.config.resource import ProtectedResourceConfig
from verifier.config.revocation import check_transmitter_scopes
from verifier.doors.admin_http import add_admin_routes
from verifier.doors.forward_auth import ForwardAuthDoor
from verifier.doors.grpc import GrpcDoors
from verifier.doors.metadata_http import add_metadata_routes
from verifier.doors.routes import HttpRequest, Router
from verifier.doors.ssf_http import add_ssf_routes
from verifier.doors.webauthn_http import add_webauthn_routes
from verifier.observe.audit import FLUSH_INTERVAL_SECONDS, flush_logs
from verifier.observe.metrics import Metrics
from verifier.pipeline import Admitted, Pipeline, Refused
from verifier.policy.metadata import resource_documents
from verifier.policy.ratelimit import RateLimiter
from verifier.policy.roles import IssuerRoles, RoleMapper
from verifier.policy.rules import PolicySet
from verifier.principal import Principal
from verifier.revocation import RevocationService
from verifier.revocation.service import SSF_USER_AGENT
from verifier.revocation.ssf import CredentialRevocation
from verifier.revocation.store import MemoryStore, RedisStore, RevocationStore, SqliteStore
from verifier.settings import ADMIN_TOKEN_ENV, Settings
from verifier.state import StateConfig, build_state
from verifier.tokens.cache import ExpiringCache
from verifier.tokens.fetch import Fetcher, HttpFetcher
from verifier.tokens.introspection import Introspector
from verifier.tokens.jwks import IssuerKeys, KeyStore
from verifier.tokens.jwt import JwtVerifier
from verifier.webauthn import SqliteCredentialStore, WebAuthnService

log = logging.getLogger("verifier.app")

SHUTDOWN_GRACE_SECONDS = 5.0  # in-flight calls get this long to finish on SIGTERM
METRICS_REFRESH_SECONDS = 5.0  # how often gauges derived from state (key age) are updated


def revocation_store(state: StateConfig | None) -> RevocationStore:
    """Where revocation entries live: the shared Redis, else a local file that outlives a worker, else memory."""
    if state is not None and state.redis_url:
        return RedisStore(state.redis_url, key_prefix=state.key_prefix, password=state.password)
    if state is not None and state.path:  # survives a reload or a worker restart
        return SqliteStore(state.path)
    return MemoryStore()


@dataclasses.dataclass
class BoundPorts:
    """Where the doors actually listen (useful with port 0)."""

    grpc: int | None = None
    http: int | None = None
    metrics: int | None = None


class App:
    """The running verifier."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        fetcher: Fetcher | None = None,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self._own_fetcher = fetcher is None
        self.fetcher: Fetcher = fetcher or HttpFetcher()
        self.metrics = metrics or Metrics()
        self.reuse_port = reuse_port
        self.keys = KeyStore(
            {i.issuer: IssuerKeys(i, self.fetcher, self.clock, self.metrics) for i in settings.issuers}
        )
        self.jwt = JwtVerifier(
            {i.issuer: i for i in settings.issuers}, self.keys, self.clock, max_token_bytes=settings.max_token_bytes
        )
        self.state = build_state(settings.state, self.clock)
        self.dpop = DpopVerifier(settings.dpop or DpopConfig(), self.state, self.clock)
        self.introspectors = {
            i.issuer: Introspector(
                issuer=i.issuer,
                audiences=i.audiences,
                config=i.introspection,
                endpoint=None,
                session_provider=self._session,
                clock=self.clock,
                registry=self.metrics.registry,
                discovered_endpoint=self._discovered("introspection_endpoint", i.issuer),
            )
            for i in settings.issuers
            if i.introspection is not None
        }
        self.revocation: RevocationService | None = None
        self._ssf_session: aiohttp.ClientSession | None = None
        if settings.revocation is not None:
            check_transmitter_scopes(settings.revocation, (i.issuer for i in settings.issuers))
            self.revocation = RevocationService(
                settings.revocation,
                store=revocation_store(settings.state),
                admin_token=os.environ.get(ADMIN_TOKEN_ENV),  # validated by load_settings
                session=self._ssf_client,
                state=self.state,
                fetcher=self.fetcher,
                clock=self.clock,
                registry=self.metrics.registry,
                on_credential_revoked=self._credentials_revoked,
            )
        self.webauthn: WebAuthnService | None = None
        if settings.webauthn is not None:
            self.webauthn = WebAuthnService(
                settings.webauthn,
                SqliteCredentialStore(settings.webauthn.sqlite_path),
                self.state,
                self.clock,
                self.metrics.registry,
                realm=settings.realm,
            )
        self.positive: ExpiringCache[Admitted] = ExpiringCache(settings.cache.token_entries, self.clock)
        self.negative: ExpiringCache[Refused] = ExpiringCache(settings.cache.negative_entries, self.clock)
        policies = PolicySet(settings.policies, settings.protected_resource)
        with_roles = IssuerRoles({i.issuer: RoleMapper(i.roles) for i in settings.issuers if i.roles})
        # Tried in order; a token goes to a provider only if that provider is responsible for it and
        # the route trusts it (settings refuse two opaque-token issuers a route could not tell apart).
        authenticators: list[Authenticator] = [JwtAuthenticator(self.jwt)]
        authenticators += [
            OpaqueIntrospection(i.issuer, self.introspectors[i.issuer])
            for i in settings.issuers
            if i.introspection is not None and i.introspection.opaque_tokens
        ]
        # Run in this order on every request, a cached token's included (see verifier.checks).
        checks: list[Check] = [RouteTrust()]  # first: a token the route does not take goes no further
        introspect_jwts = frozenset(i.issuer for i in settings.issuers if i.introspect_jwts)
        if introspect_jwts:
            checks.append(IntrospectJwts(introspect_jwts, self.introspectors))
        # Several workers without Redis would each accept a proof once: DPoP is refused instead
        # (configuring it that way is refused at start-up).
        checks.append(DpopBinding(self.dpop if settings.state_is_shared else None))
        if self.revocation is not None:
            checks.append(
                Revocation(self.revocation.revocations, with_roles=with_roles, on_revoked=self.revocation.count_refusal)
            )
        checks.append(CertificateBinding())
        if policies.enabled:
            checks.append(RoutePolicy(self.clock, lambda issuer: self._discovered("authorization_endpoint", issuer)()))
            checks.append(WebAuthnStepUp(self.webauthn))
        if settings.rate_limits:
            checks.append(RateLimit(RateLimiter(settings.rate_limits, self.state, self.clock)))
        self.pipeline = Pipeline(
            authenticators=authenticators,
            checks=checks,
            positive=self.positive,
            negative=self.negative,
            clock=self.clock,
            metrics=self.metrics,
            realm=settings.realm,
            negative_ttl=settings.cache.negative_ttl_seconds,
            audit_enabled=settings.audit,
            policies=policies,
            with_roles=with_roles,
            dpop_algs=self.dpop.algorithms,
            max_pending=settings.max_pending_checks,
            deadline=settings.deadline_seconds,
            edge_max_age=settings.edge_cache.max_age_seconds,
            refusal_max_age=settings.edge_cache.refusal_max_age_seconds,
        )
        self.router = Router()
        add_metadata_routes(  # RFC 9728: unauthenticated discovery of the resources and their issuers
            self.router,
            resource_documents(
                settings.policies or (),
                settings.protected_resource,
                [i.issuer for i in settings.issuers],
                self.dpop.algorithms,
                dpop_configured=settings.dpop is not None,
            ),
            max_age=(settings.protected_resource or ProtectedResourceConfig()).max_age_seconds,
        )
        if self.webauthn is not None:
            add_webauthn_routes(self.router, self.webauthn, self._authenticate)
        self.forward_auth = ForwardAuthDoor(
            self.pipeline,
            self.metrics,
            self.ready,
            self.router,
            settings=settings.forward_auth,
            thumbprint_header=settings.mtls_thumbprint_header,
        )
        self.grpc = GrpcDoors(self.pipeline, self.metrics, self.ready)
        self.ports = BoundPorts()
        self._extra_session: aiohttp.ClientSession | None = None
        self._extras_ready = self.revocation is None
        if self.revocation is not None:
            add_ssf_routes(self.router, self.revocation)
            add_admin_routes(self.router, self.revocation.admin)
        self._metrics_runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _ssf_client(self) -> aiohttp.ClientSession:
        """The revocation poller's session (its own User-Agent), built here and closed in `stop`."""
        if self._ssf_session is None or self._ssf_session.closed:
            self._ssf_session = aiohttp.ClientSession(headers={"User-Agent": SSF_USER_AGENT})
        return self._ssf_session

    def _session(self) -> aiohttp.ClientSession:
        if isinstance(self.fetcher, HttpFetcher):
            return self.fetcher.session
        if self._extra_session is None or self._extra_session.closed:
            self._extra_session = aiohttp.ClientSession()
        return self._extra_session

    def _discovered(self, name: str, issuer: str) -> Callable[[], str]:
        """A late-bound lookup of a discovery metadata value (discovery happens after start-up)."""

        def lookup() -> str:
            keys = self.keys.get(issuer)
            value = keys.metadata.get(name) if keys is not None else None
            return value if isinstance(value, str) else ""

        return lookup

    async def _credentials_revoked(self, revoked: CredentialRevocation) -> None:
        """A CAEP credential-change for a WebAuthn credential: the user's keys are disabled here."""
        if self.webauthn is not None:
            ids = list(revoked.credential_ids) or None
            await self.webauthn.disable_credentials(revoked.issuer, revoked.subject, ids, aaguid=revoked.aaguid)

    async def _authenticate(self, request: HttpRequest) -> Principal:
        attrs = self.forward_auth.attributes(request.method, request.path.encode(), dict(request.headers), request.peer)
        return await self.pipeline.authenticate(attrs)

    async def wait_serving(self) -> None:
        """Returns once the verifier reports SERVING."""
        while not self.ready():
            await asyncio.sleep(0.05)

    def ready(self) -> bool:
        """SERVING once every issuer's keys are loaded (and revocation entries, when configured)."""
        return self.keys.ready and self._extras_ready

    async def start(self) -> None:
        """Starts key fetching and every configured door; SERVING follows the first good key fetch."""
        self.keys.start()
        s = self.settings
        if s.http is not None:
            self.ports.http = await self.forward_auth.start(
                s.http.host,
                s.http.port,
                reuse_port=self.reuse_port,
                tls=s.http.tls.server_context() if s.http.tls else None,
            )
        if s.grpc is not None:
            self.ports.grpc = await self.grpc.start(
                s.grpc.address, reuse_port=self.reuse_port, tls=s.grpc.tls.read() if s.grpc.tls else None
            )
        if s.metrics is not None:
            self.ports.metrics = await self._start_metrics(
                s.metrics.host, s.metrics.port, s.metrics.tls.server_context() if s.metrics.tls else None
            )
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._serve_when_ready()))
        self._tasks.append(loop.create_task(self._refresh_gauges()))
        self._tasks.append(loop.create_task(self._flush_logs()))
        log.info("verifier started", extra={"event": "started", "ports": dataclasses.asdict(self.ports)})

    async def _serve_when_ready(self) -> None:
        if self.revocation is not None:
            await self.revocation.start()  # a late replica loads current entries before SERVING
            self._extras_ready = True
        await self.keys.wait_ready()
        await self.grpc.set_serving(True)
        log.info("serving", extra={"event": "serving"})

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            flush_logs()

    async def _refresh_gauges(self) -> None:
        while True:
            for issuer, keys in self.keys.issuers.items():
                age = keys.key_age()
                if age is not None:
                    self.metrics.jwks_key_age.labels(issuer).set(age)
                    self.metrics.jwks_refresh_interval.labels(issuer).set(keys.refresh_interval())
            ping = getattr(self.state, "ping", None)  # Redis only: the in-memory store is always there
            if ping is not None:
                self.metrics.state_up.labels("redis").set(1.0 if await ping() else 0.0)
            await asyncio.sleep(METRICS_REFRESH_SECONDS)

    async def _start_metrics(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

        async def healthz(_: web.Request) -> web.Response:
            ok = self.ready()
            return web.Response(status=200 if ok else 503, text="SERVING\n" if ok else "NOT_SERVING\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=self.reuse_port or None, ssl_context=tls)
        await site.start()
        self._metrics_runner = runner
        server = site._server  # aiohttp exposes no public accessor for the bound port
        sockets = getattr(server, "sockets", None) or ()
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Graceful shutdown: stop accepting, drain in-flight calls, close clients."""
        await self.grpc.stop(grace)
        await self.forward_auth.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.keys.stop()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self.revocation is not None:
            await self.revocation.stop()
        if self.webauthn is not None:
            await self.webauthn.close()
        for introspector in self.introspectors.values():
            await introspector.close()
        await self.state.close()
        if self._extra_session is not None:
            await self._extra_session.close()
        if self._ssf_session is not None:
            await self._ssf_session.close()
        if self._own_fetcher and isinstance(self.fetcher, HttpFetcher):
            await self.fetcher.close()
        flush_logs()
