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
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from verifier.authenticators import Authenticator, JwtAuthenticator, OpaqueIntrospection
from verifier.binding.dpop import DpopVerifier
from verifier.checks.base import Check
from verifier.checks.certificate import CertificateBinding
from verifier.checks.dpop import DpopBinding
from verifier.checks.introspect_jwts import IntrospectJwts
from verifier.checks.policy import RoutePolicy
from verifier.checks.rate_limit import RateLimit
from verifier.checks.revocation import Revocation, TokenAgeBound
from verifier.checks.step_up import WebAuthnStepUp
from verifier.checks.trust import RouteTrust
from verifier.clock import Clock, SystemClock
from verifier.config.dpop import DpopConfig
from verifier.config.introspection import IntrospectionConfig
from verifier.config.issuer import MAX_LEEWAY_SECONDS
from verifier.config.resource import ProtectedResourceConfig
from verifier.config.revocation import REPLACE, RevocationConfig, check_transmitter_scopes
from verifier.doors.admin_http import add_admin_routes
from verifier.doors.answer_memo import AnswerMemo
from verifier.doors.forward_auth import ForwardAuthDoor
from verifier.doors.grpc import GrpcDoors
from verifier.doors.jwks_http import add_jwks_route
from verifier.doors.logout_http import add_logout_routes
from verifier.doors.metadata_http import add_metadata_routes
from verifier.doors.public_origin import PublicOrigins
from verifier.doors.routes import HttpRequest, Router
from verifier.doors.ssf_http import add_ssf_routes
from verifier.doors.webauthn_http import add_webauthn_routes
from verifier.errors import MalformedToken, StateUnavailable, TenantNotAllowed, UnknownIssuer
from verifier.generation import Generation
from verifier.observe.audit import flush_logs
from verifier.observe.logsink import FLUSH_INTERVAL_SECONDS
from verifier.observe.metrics import (
    IntrospectionMetrics,
    IssuerIntrospectionMetrics,
    Metrics,
    RevocationMetrics,
    WebAuthnMetrics,
)
from verifier.observe.scrape_auth import PAGE_HEADERS, UNAUTHORIZED_HEADERS, scrape_authorized
from verifier.observe.tracing import NO_TRACING, Tracing
from verifier.pipeline import Admitted, Pipeline, Refused
from verifier.policy.metadata import resource_documents
from verifier.policy.ratelimit import RateLimiter
from verifier.policy.roles import IssuerRoles, RoleMapper
from verifier.policy.rules import PolicySet
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.revocation import RevocationService
from verifier.revocation.entry import REFUSAL_CODES
from verifier.revocation.logout import BackchannelLogout, LogoutTokenVerifier
from verifier.revocation.ssf import CredentialRevocation
from verifier.revocation.store import DEFAULT_TIMEOUT_SECONDS as STORE_TIMEOUT_SECONDS
from verifier.revocation.store import MemoryStore, RedisStore, RevocationStore, SqliteStore
from verifier.settings import ADMIN_TOKEN_ENV, IssuerSettings, Settings, config_warnings
from verifier.state import MemoryState, SharedState, StateConfig
from verifier.state.redis import RedisState
from verifier.state.sqlite import SqliteState
from verifier.tokens.cache import ExpiringCache
from verifier.tokens.fetch import Fetcher, HttpFetcher, issuer_tls
from verifier.tokens.introspection import Introspector
from verifier.tokens.introspection_breaker import BreakerState, CircuitBreaker
from verifier.tokens.introspection_http import IntrospectionHttpClient
from verifier.tokens.jwks import IssuerKeys, KeyStore
from verifier.tokens.jwt import JwtVerifier
from verifier.tokens.tenants import TenantKeys
from verifier.upstream import UpstreamAnswers
from verifier.webauthn import SqliteCredentialStore, WebAuthnService

log = logging.getLogger("verifier.app")

SHUTDOWN_GRACE_SECONDS = 5.0  # in-flight calls get this long to finish on SIGTERM
METRICS_REFRESH_SECONDS = 5.0  # how often gauges derived from state (key age) are updated
# How often gRPC health is brought in line with `App.ready()` once serving (the HTTP doors ask it per probe): well
# inside an active health check's interval (Envoy's, Kubernetes' probe period: seconds), for a few attribute reads.
READINESS_POLL_SECONDS = 0.25
# Refusals the refused-token cache holds that no key was asked for: a JWKS change changes none of them.
_BEFORE_ANY_KEY = (MalformedToken, UnknownIssuer, TenantNotAllowed)
USER_AGENT = "edge-verifier/0.1"  # what a provider sees on discovery, JWKS and introspection requests
SSF_USER_AGENT = "edge-verifier/0.1 (ssf receiver)"  # what a transmitter sees on poll requests


class HttpSessions:
    """Every outbound HTTP session, built inside the event loop on first use and closed by `close`.

    One pooled keep-alive session serves discovery and JWKS for every issuer; introspection has the
    lean HTTP/1.1 client (`verifier.tokens.introspection_http`: a first-seen opaque token costs one call),
    one more per issuer TLS rules (`introspection_for`); the SSF poller has its own session, so a
    transmitter sees the receiver's User-Agent.
    """

    def __init__(self, tracing: Tracing = NO_TRACING) -> None:
        self._open: dict[str, aiohttp.ClientSession] = {}
        self._tracing = tracing
        self.introspection = IntrospectionHttpClient(default_headers=(("User-Agent", USER_AGENT),), tracing=tracing)
        self._introspection_tls: dict[tuple[str, tuple[str, ...]], IntrospectionHttpClient] = {}

    def introspection_for(self, issuer: IssuerSettings) -> IntrospectionHttpClient:
        """The introspection client under the issuer's TLS rules (`tls_ca_file`, `jwks_pin_sha256`), as its
        discovery and JWKS are fetched: the shared client when it has none. Its own pool: a connection
        trusted under one issuer's rules is never handed to another's."""
        rules = (issuer.tls_ca_file, issuer.jwks_pin_sha256)
        if not any(rules):
            return self.introspection
        client = self._introspection_tls.get(rules)
        if client is None:
            client = self._introspection_tls[rules] = IntrospectionHttpClient(
                default_headers=(("User-Agent", USER_AGENT),),
                tls=issuer_tls(ca_file=issuer.tls_ca_file, pins=issuer.jwks_pin_sha256),
                https_only=True,
                tracing=self._tracing,
            )
        return client

    def providers(self) -> aiohttp.ClientSession:
        """Discovery and JWKS."""
        session = self._open.get("providers")
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=64, ttl_dns_cache=300, enable_cleanup_closed=True)
            session = self._open["providers"] = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
                auto_decompress=True,
            )
        return session

    def ssf(self) -> aiohttp.ClientSession:
        """The SSF poller's."""
        session = self._open.get("ssf")
        if session is None or session.closed:
            session = self._open["ssf"] = aiohttp.ClientSession(headers={"User-Agent": SSF_USER_AGENT})
        return session

    async def close(self) -> None:
        """Closes every session built so far."""
        for session in self._open.values():
            await session.close()
        self._open.clear()
        await self.introspection.close()
        for client in self._introspection_tls.values():
            await client.close()


def _token_issuers(issuers: Iterable[IssuerSettings]) -> list[str]:
    """The issuers tokens may name: each configured one, a template's listed tenants each (`tenants: any` names
    none in advance)."""
    names: list[str] = []
    for issuer in issuers:
        if issuer.is_template:
            names += [issuer.for_tenant(t).issuer for t in issuer.tenants if not issuer.any_tenant]
        else:
            names.append(issuer.issuer)
    return names


def build_introspector(
    *, issuer: str, config: IntrospectionConfig, clock: Clock, registry: CollectorRegistry, **options: Any
) -> Introspector:
    """One issuer's introspector, with its metrics and its circuit breaker (reported on the breaker gauge).

    `options` are the rest of `Introspector`'s arguments (audiences, endpoint, the HTTP seam).
    """
    metrics = IssuerIntrospectionMetrics(IntrospectionMetrics.for_registry(registry), issuer)
    metrics.breaker.set(int(BreakerState.CLOSED))
    breaker = CircuitBreaker(
        failure_threshold=config.breaker_failures,
        cooldown_seconds=config.breaker_cooldown_seconds,
        success_window_seconds=config.breaker_success_window_seconds,
        clock=clock,
        on_change=lambda state: metrics.breaker.set(int(state)),
    )
    return Introspector(issuer=issuer, config=config, clock=clock, metrics=metrics, breaker=breaker, **options)


def redis_client(url: str, *, password: str | None, timeout_seconds: float, subscriber: bool = False) -> Redis:
    """A Redis connection pool with `timeout_seconds` per socket operation.

    One retry, only for a broken pooled connection (Redis restarted); never on a timeout, where the
    command may already have run and a retry could burn a jti or a token twice. A `subscriber`'s
    connection blocks on reads by design: no read timeout on it. The retry names its errors: redis-py's
    `Retry` retries timeouts too by default, whatever `retry_on_timeout` says (a fresh DPoP proof sent to a busy
    Redis was answered "replayed", its first run having marked the `jti`).
    """
    if subscriber:
        return Redis.from_url(url, password=password, socket_connect_timeout=timeout_seconds, decode_responses=False)
    return Redis.from_url(
        url,
        password=password,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry_on_timeout=False,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        decode_responses=False,
    )


def shared_state(config: StateConfig | None, clock: Clock, buckets: Mapping[str, int] | None = None) -> SharedState:
    """The configured store: Redis if a URL is set, else a file every process of this host shares (`path`:
    replay keys outlive a worker), else a bounded in-memory store. `buckets`: with Redis, its bound of rate-limit
    buckets per `issuers[]` entry (`Settings.redis_bucket_bounds`); None, `state.redis_max_buckets` for all."""
    if config is None or config.redis_url is None:
        config = config or StateConfig()
        if config.path:
            local = MemoryState(clock, max_entries=config.max_entries)
            return SqliteState(config.path, clock, replay=config.replay_bounds, buckets=local)
        return MemoryState(clock, max_entries=config.max_entries, replay=config.replay_bounds)
    client = redis_client(config.redis_url, password=config.password, timeout_seconds=config.timeout_seconds)
    return RedisState(
        client,
        key_prefix=config.key_prefix,
        timeout_seconds=config.timeout_seconds,
        replay=config.redis_replay_bounds,
        max_buckets=config.redis_max_buckets if buckets is None else buckets,
        clock=clock,
    )


def revocation_store(state: StateConfig | None) -> RevocationStore:
    """Where revocation entries live: the shared Redis, else a local file that outlives a worker, else memory."""
    if state is not None and state.redis_url:
        timeout, password = STORE_TIMEOUT_SECONDS, state.password
        return RedisStore(
            redis_client(state.redis_url, password=password, timeout_seconds=timeout),
            redis_client(state.redis_url, password=password, timeout_seconds=timeout, subscriber=True),
            key_prefix=state.key_prefix,
            timeout_seconds=timeout,
            replicas=state.redis_revocation_replicas,
        )
    if state is not None and state.path:  # survives a reload or a worker restart
        return SqliteStore(state.path)
    return MemoryStore()


@dataclasses.dataclass
class BoundPorts:
    """Where the doors actually listen (useful with port 0)."""

    grpc: int | None = None
    http: int | None = None
    metrics: int | None = None
    admin: int | None = None


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
        http_sockets: list[socket.socket] | None = None,
        accept_when_serving: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.http_sockets = http_sockets  # the forward-auth door's listening sockets, bound by the supervisor
        # A reload's successor: the old worker still answers on the shared sockets, so this one takes no
        # connection before SERVING (what it took would get 503 until its keys and entries are in).
        self.accept_when_serving = accept_when_serving
        # Spans only when configured (the `tracing` section or OTEL_* variables; `tracing` replaces it in
        # tests). Off: the doors hold None and never touch tracing; fetches and audit get the null object.
        if tracing is None and settings.tracing is not None:
            from verifier.observe.otel import build_tracing  # OpenTelemetry is loaded only when used

            tracing = build_tracing(settings.tracing)
        self.tracing = tracing
        traced: Tracing = tracing or NO_TRACING
        self.clock = clock or SystemClock()
        self.sessions = HttpSessions(traced)
        self.fetcher: Fetcher = fetcher or HttpFetcher(self.sessions.providers)
        self.metrics = metrics or Metrics()
        self.reuse_port = reuse_port
        self.keys = KeyStore(
            {
                i.issuer: IssuerKeys(i, self._fetcher_for(i), self.clock, self.metrics, traced)
                for i in settings.issuers
                if not i.is_template
            },
            [
                TenantKeys(i, self._fetcher_for(i), self.clock, self.metrics, traced)
                for i in settings.issuers
                if i.is_template
            ],
        )
        self.jwt = JwtVerifier(
            {i.issuer: i for i in settings.issuers}, self.keys, self.clock, max_token_bytes=settings.max_token_bytes
        )
        self.state = shared_state(settings.state, self.clock, settings.redis_bucket_bounds)
        local_state = self.state
        if isinstance(local_state, MemoryState | SqliteState | RedisState):  # bounded: full, it refuses
            self.metrics.replay_store(lambda: local_state.full.refused)
        if isinstance(local_state, RedisState):  # its buckets are bounded too: full, it refuses a new one
            self.metrics.bucket_store(lambda: local_state.bucket_refusals)
        self.dpop = DpopVerifier(settings.dpop or DpopConfig(), self.state, self.clock)
        self.introspectors = {
            i.issuer: build_introspector(
                issuer=i.issuer,
                audiences=i.audiences,
                config=i.introspection,
                endpoint=None,
                http=self.sessions.introspection_for(i),
                clock=self.clock,
                registry=self.metrics.registry,
                discovered_endpoint=self._discovered("introspection_endpoint", i.issuer),
                discovered_batch_endpoint=self._discovered("introspection_batch_endpoint", i.issuer),
                discovery_url=i.discovery,
                leeway_seconds=i.leeway_seconds,
            )
            for i in settings.issuers
            if i.introspection is not None
        }
        # Bumped by every change to what a from-memory decision reads (revocation entries, the token caches,
        # WebAuthn credentials): the forward-auth door's remembered answers go stale at once.
        self.generation = Generation()
        self.revocation: RevocationService | None = None
        logout_issuers = [i for i in settings.issuers if i.backchannel_logout is not None]
        # Back-channel logout keeps its entries in the revocation index, store and channel: with no
        # `revocation` section the service runs on its defaults (no transmitters).
        revocation_config = settings.revocation or (RevocationConfig() if logout_issuers else None)
        if revocation_config is not None:
            check_transmitter_scopes(revocation_config, (i.issuer for i in settings.issuers))
            self.revocation = RevocationService(
                revocation_config,
                store=revocation_store(settings.state),
                admin_token=os.environ.get(ADMIN_TOKEN_ENV),  # validated by load_settings
                session=self.sessions.ssf,
                state=self.state,
                fetcher=self.fetcher,
                clock=self.clock,
                metrics=RevocationMetrics(self.metrics.registry, REFUSAL_CODES),
                on_credential_revoked=self._credentials_revoked,
                tracing=traced,
                generation=self.generation,
                issuers=_token_issuers(settings.issuers),
                leeway_seconds=max((i.leeway_seconds for i in settings.issuers), default=0.0),
            )
        self.webauthn: WebAuthnService | None = None
        if settings.webauthn is not None:
            self.webauthn = WebAuthnService(
                settings.webauthn,
                SqliteCredentialStore(settings.webauthn.sqlite_path),
                self.state,
                self.clock,
                WebAuthnMetrics(self.metrics.registry),
                realm=settings.realm,
                trace_id=traced.trace_id,
                # an authentication counts as after a revocation only past every issuer's clock skew allowance
                leeway_seconds=max((i.leeway_seconds for i in settings.issuers), default=MAX_LEEWAY_SECONDS),
            )
        cache = settings.cache
        self.positive: ExpiringCache[Admitted] = ExpiringCache(cache.token_entries, self.clock, self.generation)
        # The refused-token cache keeps a generation of its own: remembered answers are allows, which no change
        # to it can make stale (a token is looked up in the verified-token cache first), while a flood of distinct
        # junk pushing its entries out bumped the shared generation on every store and emptied every answer memo.
        self.negative: ExpiringCache[Refused] = ExpiringCache(cache.negative_entries, self.clock)
        # A key the provider withdraws (it leaked) stops vouching for the tokens it signed, cached ones included.
        self.keys.watch_withdrawn(self._keys_withdrawn)
        for name, held in (("positive", self.positive), ("negative", self.negative)):
            self.metrics.token_cache_entries.labels(name).set_function(held.__len__)  # read at each scrape
        policies = PolicySet(settings.policies, settings.protected_resource)
        with_roles = IssuerRoles(
            {i.issuer: RoleMapper(i.roles) for i in settings.issuers if i.roles}, configured=self.keys.configured
        )
        # Tried in order; a token goes to a provider only if that provider is responsible for it and
        # the route trusts it (settings refuse two opaque-token issuers a route could not tell apart).
        authenticators: list[Authenticator] = [JwtAuthenticator(self.jwt)]
        authenticators += [
            OpaqueIntrospection(i.issuer, self.introspectors[i.issuer])
            for i in settings.issuers
            if i.introspection is not None and i.introspection.opaque_tokens
        ]
        # Run in this order on every request, a cached token's included (see verifier.checks).
        # First: a token the route does not take goes no further (a template on a route stands for its tenants).
        checks: list[Check] = [RouteTrust(self.keys.configured)]
        introspect_jwts = frozenset(i.issuer for i in settings.issuers if i.introspect_jwts)
        if introspect_jwts:
            checks.append(IntrospectJwts(introspect_jwts, self.introspectors))
        # Several workers without Redis would each accept a proof once: DPoP is refused instead
        # (configuring it that way is refused at start-up).
        checks.append(DpopBinding(self.dpop if settings.state_is_shared else None))
        if self.revocation is not None:
            checks.append(
                Revocation(
                    self.revocation.revocations,
                    with_roles=with_roles,
                    on_revoked=self.revocation.count_refusal,
                    max_lifetime=float(self.revocation.config.max_token_lifetime_seconds),
                    clock=self.clock,
                    may_raise=frozenset(
                        t.issuer for t in self.revocation.config.transmitters if t.claims_change == REPLACE
                    ),
                )
            )
            # An allow for a token without `exp` is not reused past the age at which the check above refuses it.
            checks.append(TokenAgeBound(float(self.revocation.config.max_token_lifetime_seconds)))
        checks.append(CertificateBinding())
        if policies.enabled:
            checks.append(RoutePolicy(self.clock, lambda issuer: self._discovered("authorization_endpoint", issuer)()))
            checks.append(WebAuthnStepUp(self.webauthn))
        if settings.rate_limits:
            limiter = RateLimiter(settings.rate_limits, self.state, self.clock, configured=self.keys.configured)
            checks.append(RateLimit(limiter))
        self.upstream = UpstreamAnswers(settings.upstream)  # keys parsed at start-up, by the settings
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
            upstream=self.upstream,
            tracing=traced,
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
        if self.upstream.assertions is not None:
            add_jwks_route(self.router, self.upstream.assertions.jwks)
        # Our own endpoints' requests are on the declared origin their `Host` names (verifier.doors.public_origin).
        self.public_origins = PublicOrigins.declared(settings.dpop.origins if settings.dpop is not None else ())
        if self.webauthn is not None:
            add_webauthn_routes(self.router, self.webauthn, self._authenticate, self.public_origins)
        # A policy matches on hosts: a check that tells no host (forward-auth without the family's host header, behind
        # nginx its `Host` is the verifier's own name; a gRPC Check with an empty host) met none of its host's
        # policies and fell to a laxer one. Every door refuses it (`verifier.request.Undescribed`).
        hosts_named = any(p.match.hosts for p in settings.policies or ())
        self.forward_auth = ForwardAuthDoor(
            self.pipeline,
            self.metrics,
            self.ready,
            self.router,
            started=self.started,
            settings=settings.forward_auth,
            thumbprint_header=settings.mtls_thumbprint_header,
            tracing=tracing,
            # Remembered answers stand for cached tokens: with no token cache, every request is judged afresh.
            memo=AnswerMemo(self.clock, self.generation) if cache.token_entries > 0 else None,
            hosts_named=hosts_named,
        )
        self.grpc = GrpcDoors(
            self.pipeline,
            self.metrics,
            self.ready,
            tracing,
            answers=(lambda: AnswerMemo(self.clock, self.generation)) if cache.token_entries > 0 else None,
            hosts_named=hosts_named,
        )
        self.ports = BoundPorts()
        self._extras_ready = self.revocation is None
        # The kill switch: on its own listener when `admin.listen` is set (the forward-auth one then answers its
        # paths 404), else beside forward-auth as before.
        self.admin: ForwardAuthDoor | None = None
        admin_router = self.router
        if settings.admin is not None:
            admin_router = Router()
            self.admin = ForwardAuthDoor(
                self.pipeline,
                self.metrics,
                self.ready,
                admin_router,
                started=self.started,
                settings=settings.forward_auth,  # the same header and idle timeouts
                checks=False,
            )
        if self.revocation is not None:
            add_ssf_routes(self.router, self.revocation)
            add_admin_routes(admin_router, self.revocation.admin)
            if logout_issuers:
                add_logout_routes(self.router, self._backchannel_logout(logout_issuers, self.revocation))
        self._metrics_runner: web.AppRunner | None = None
        self._metrics_server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _backchannel_logout(self, issuers: list[IssuerSettings], revocation: RevocationService) -> BackchannelLogout:
        """The logout-token receiver: the issuers' access-token keys, the revocation service's entries."""
        verifier = LogoutTokenVerifier({i.issuer: (i, self.keys.issuers[i.issuer]) for i in issuers}, self.clock)
        return BackchannelLogout(
            verifier,
            state=self.state,
            add=revocation.add,
            metrics=revocation.metrics,
            clock=self.clock,
            entry_lifetime=revocation.entry_lifetime,
        )

    def _fetcher_for(self, issuer: IssuerSettings) -> Fetcher:
        """The fetcher of one issuer's discovery and JWKS: the shared one, or its view with the issuer's TLS rules."""
        if not (issuer.jwks_pin_sha256 or issuer.tls_ca_file):
            return self.fetcher
        if not isinstance(self.fetcher, HttpFetcher):  # a pin nobody checks would be a silent pass
            raise ValueError(f"{issuer.issuer}: jwks_pin_sha256 and tls_ca_file need the HTTP fetcher")
        return self.fetcher.with_tls(ca_file=issuer.tls_ca_file, pins=issuer.jwks_pin_sha256)

    def _discovered(self, name: str, issuer: str) -> Callable[[], str]:
        """A late-bound lookup of a discovery metadata value (discovery happens after start-up)."""

        def lookup() -> str:
            keys = self.keys.get(issuer)
            value = keys.metadata.get(name) if keys is not None else None
            return value if isinstance(value, str) else ""

        return lookup

    def _keys_withdrawn(self, issuer: str, kids: frozenset[str | None]) -> None:
        """Forgets the verified tokens of `issuer` signed by the withdrawn keys: the next request is judged afresh.
        And the refusals given once a key was found (its signature, its type, the claims it vouched for): a withdrawn
        kid may now name another key (a rotation that keeps the kid, a provider with one key and no kid), with which
        a token refused under the old one was signed, and a token whose key is gone is refused for that, as a first
        sight is. A refusal does not say whose key it was (it would keep the sender's `iss` and `kid` alive): every
        such one is judged afresh; those given before any key (not a JWS, an issuer not configured) stay. Told no kids
        when a fetch only added keys: no verified token is forgotten, but a token without a kid refused under the keys
        of before (a rotation overlap: none of them verified it) may verify under a new one, so the refusals go too."""
        self.positive.discard_where(lambda held: held.principal.issuer == issuer and held.principal.kid in kids)
        self.negative.discard_where(lambda refused: not isinstance(refused.error, _BEFORE_ANY_KEY))

    async def _credentials_revoked(self, revoked: CredentialRevocation) -> None:
        """A CAEP credential-change for a WebAuthn credential: the user's keys are disabled here."""
        if self.webauthn is not None:
            ids = list(revoked.credential_ids) or None
            await self.webauthn.disable_credentials(revoked.issuer, revoked.subject, ids, aaguid=revoked.aaguid)
            self.generation.bump()

    async def _authenticate(self, request: HttpRequest, own: RequestAttributes) -> Principal:
        """The caller of our own endpoints, judged on `own` (`verifier.doors.webauthn_http.attributes`): the request
        made to our endpoint, its own method and target (as its step-up binding reads them), never a caller's
        X-Forwarded-Method/-Uri, against which a DPoP proof made for any other request passed. With `dpop.origins`
        declared, on the declared origin its `Host` names (behind a TLS gateway, `https://<public host>`)."""
        if not self.public_origins:
            # None declared: as before, the scheme and host the forward-auth family names (X-Forwarded-Proto/-Host,
            # which only a gateway publishing these endpoints overwrites), else http and `Host`.
            forwarded = self.forward_auth.attributes(request.method, b"", dict(request.headers), request.peer)
            own = own._replace(scheme=forwarded.scheme, host=forwarded.host)
        # No certificate: `mtls_thumbprint_header` is what a gateway overwrites on forward-auth requests, and no
        # gateway publishes these endpoints (here the header is the caller's word): a certificate-bound token fails.
        return await self.pipeline.authenticate(own._replace(client_cert_thumbprint=""))

    async def wait_serving(self) -> None:
        """Returns once the verifier reports SERVING."""
        while not self.ready():
            await asyncio.sleep(0.05)

    def started(self) -> bool:
        """Every issuer's keys loaded (and revocation entries, when configured) once: `/healthz`, as before
        readiness followed the revocation store. What a probe asks whose failure takes more than this verifier
        out of service (the shipped Kubernetes sidecar, where the verifier's readiness is the Kong pod's: a Redis
        outage must not take the routes the verifier does not guard down with it)."""
        return self.keys.ready and self._extras_ready

    def ready(self) -> bool:
        """SERVING while this replica can decide (`/readyz`, gRPC health): `started`, and for as long as the
        revocation entries are current. A replica cut off from its revocation store (`Revocations.out_of_sync`)
        answers every check 503 until it reloads them: it reports NOT_SERVING, so a load balancer routes to
        replicas that can decide. Liveness (`/livez`) asks none of this: a restart cannot bring a store or a
        provider back."""
        revocation = self.revocation
        return self.started() and (revocation is None or revocation.revocations.loaded)

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
                sockets=self.http_sockets,
                accept=not self.accept_when_serving,
            )
        if s.admin is not None and self.admin is not None:
            # Every worker binds it (SO_REUSEPORT, as `http`): any of them can take a kill-switch request, whose
            # entry reaches the others through the shared store (workers > 1 need Redis for revocation).
            self.ports.admin = await self.admin.start(
                s.admin.host,
                s.admin.port,
                reuse_port=self.reuse_port,
                tls=s.admin.tls.server_context() if s.admin.tls else None,
            )
        if s.grpc is not None:
            self.ports.grpc = await self.grpc.start(
                s.grpc.address,
                reuse_port=self.reuse_port,
                tls=s.grpc.tls.read() if s.grpc.tls else None,
                max_streams=s.grpc_max_concurrent_streams,
                max_queued=s.grpc_max_queued_calls,
                max_age=s.grpc_max_connection_age_seconds,
                max_age_grace=s.grpc_max_connection_age_grace_seconds,
                max_connections=s.grpc_max_connections,
                handshake_timeout=s.grpc_handshake_timeout_seconds,
            )
        if s.metrics is not None:
            self.ports.metrics = await self._start_metrics(
                s.metrics.host, s.metrics.port, s.metrics.tls.server_context() if s.metrics.tls else None
            )
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._serve_when_ready()))
        self._tasks.append(loop.create_task(self._refresh_gauges()))
        self._tasks.append(loop.create_task(self._flush_logs()))
        for warning in config_warnings(self.settings):
            log.warning(
                warning.message, extra={"event": "config_warning", "code": warning.kind, **dict(warning.fields)}
            )
        log.info("verifier started", extra={"event": "started", "ports": dataclasses.asdict(self.ports)})

    async def _serve_when_ready(self) -> None:
        if self.revocation is not None:
            # A late replica loads current entries before SERVING; until then its revocation check answers
            # 503. A store still down after the start timeout is logged and tried again, never given up on.
            while True:
                try:
                    await self.revocation.start()
                    break
                except StateUnavailable as exc:
                    log.error(
                        "revocation entries not loaded; refusing with 503 until they are",
                        extra={"event": "revocation_store", "error": exc.description},
                    )
            self._extras_ready = True
        await self.keys.wait_ready()
        if self.accept_when_serving:
            self.forward_auth.accept()
        await self.grpc.set_serving(True)
        log.info("serving", extra={"event": "serving"})
        await self._follow_readiness()

    async def _follow_readiness(self) -> None:
        """Keeps gRPC health in line with `ready()` (the HTTP doors ask it on every probe): NOT_SERVING while the
        revocation entries cannot be kept current, SERVING again once they are reloaded."""
        serving = True
        while True:
            await asyncio.sleep(READINESS_POLL_SECONDS)
            if self.ready() is serving:
                continue
            serving = not serving
            await self.grpc.set_serving(serving)
            if serving:
                log.info("serving again", extra={"event": "serving"})
            else:
                log.warning("not serving: this replica cannot decide", extra={"event": "not_serving"})

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            flush_logs()

    async def _refresh_gauges(self) -> None:
        policy_unknown = True
        while True:
            for issuer, keys in self.keys.issuers.items():
                age = keys.key_age()
                if age is not None:
                    self.metrics.jwks_key_age.labels(issuer).set(age)
                    self.metrics.jwks_refresh_interval.labels(issuer).set(keys.refresh_interval())
            ping = getattr(self.state, "ping", None)  # Redis only: the in-memory store is always there
            if ping is not None:
                self.metrics.state_up.labels("redis").set(1.0 if await ping() else 0.0)
            if policy_unknown and isinstance(self.state, RedisState):  # once, when Redis first answers
                policy_unknown = await self.state.check_eviction_policy() is None
            await asyncio.sleep(METRICS_REFRESH_SECONDS)

    async def _start_metrics(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        token = self.settings.metrics_auth.token
        expected = token.encode() if token is not None else None  # None: no token configured, /metrics is open

        async def metrics(request: web.Request) -> web.Response:
            if expected is not None and not scrape_authorized(request.headers.getall("Authorization", ()), expected):
                return web.Response(status=401, headers=UNAUTHORIZED_HEADERS, text="unauthorized\n")
            return web.Response(
                body=self.metrics.render(), content_type="text/plain", charset="utf-8", headers=PAGE_HEADERS
            )

        async def healthz(_: web.Request) -> web.Response:  # open, token or not: kubelet probes send no credentials
            ok = self.started()  # as the forward-auth listener's `/healthz`
            return web.Response(status=200 if ok else 503, text="SERVING\n" if ok else "NOT_SERVING\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        # Idle keep-alives closed as the doors close theirs: aiohttp's own default (3,630 s) let one `GET /healthz` hold
        # a descriptor of the process the doors share for an hour.
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.settings.forward_auth.idle_timeout_seconds)
        await runner.setup()
        # Not a `web.TCPSite`: aiohttp has no header timeout (its keep-alive timer stops at a request's first
        # byte), so each connection's handler is wrapped in `_HeaderDeadline`, the forward-auth door's rule.
        handlers = runner.server
        assert handlers is not None  # set up above
        timeout = self.settings.forward_auth.header_timeout_seconds
        server = await asyncio.get_running_loop().create_server(
            lambda: _HeaderDeadline(handlers(), timeout),
            host,
            port,
            reuse_port=self.reuse_port or None,
            ssl=tls,
            ssl_handshake_timeout=timeout if tls is not None else None,
        )
        self._metrics_runner = runner
        self._metrics_server = server
        sockets = server.sockets or ()
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Graceful shutdown: stop accepting, drain in-flight calls, close clients."""
        await self.grpc.stop(grace)
        # Both HTTP listeners drain at once: the shutdown stays within one `grace`.
        await asyncio.gather(self.forward_auth.stop(grace), *([self.admin.stop(grace)] if self.admin else []))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.keys.stop()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self.revocation is not None:
            await self.revocation.stop()
        if self.webauthn is not None:
            await self.webauthn.close()
        for introspector in self.introspectors.values():
            await introspector.close()
        await self.state.close()
        await self.sessions.close()
        if self.tracing is not None:
            await self.tracing.shutdown()  # the spans still queued are exported
        flush_logs()


class _HeaderDeadline(asyncio.Protocol):
    """The metrics listener's connection protocol (aiohttp's handler inside): a connection must send each
    request within `timeout`, from its opening for the first and from its first byte for the next ones,
    else it is closed (slowloris; `http.header_timeout_seconds`, as on the forward-auth door). A request has
    arrived when what was received ends with the blank line closing its headers (these are GETs: no body);
    idle keep-alives between requests are aiohttp's to close, after `http.idle_timeout_seconds` (its
    `keepalive_timeout`)."""

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._tail = b""  # the last bytes received, to see a blank line split across reads

    def _arm(self) -> None:
        if self._timer is None and self._transport is not None:
            self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._tail = (self._tail + data)[-4:]
        if self._tail.endswith(b"\r\n\r\n"):
            self._disarm()
        else:
            self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._transport = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
