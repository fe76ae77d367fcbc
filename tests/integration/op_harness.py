"""A real OpenID Provider for integration tests: panva/node-oidc-provider driven from Python.

The provider (``tests/integration/op/server.js``) issues OAuth 2.0 client-credentials tokens:
RFC 9068 JWT access tokens (``typ: at+jwt``) signed with ES256, RS256 or EdDSA, opaque tokens
checked by RFC 7662 introspection and revoked by RFC 7009 revocation, and DPoP-bound tokens
(RFC 9449, ``cnf.jkt``). Keys are generated here and handed to the provider as a private JWKS
file, so a test can rotate them and know every kid.

Resource indicator (RFC 8707) -> token, as configured in server.js:

===================================  ===========================  ==========
resource                             ``aud``                      alg
===================================  ===========================  ==========
``https://api.example.test``         https://api.example.test     ES256
``https://api.example.test/es256``   https://api.example.test     ES256
``https://api.example.test/rs256``   https://api.example.test     RS256
``https://api.example.test/eddsa``   https://api.example.test     EdDSA
``https://other.example.test``       https://other.example.test   ES256
``https://opaque.example.test``      (opaque token)               -
===================================  ===========================  ==========

User tokens (:meth:`OpenIDProvider.user_token`) come from the authorization-code flow with PKCE:
the harness logs a user in through the test-only ``POST /__login/:uid`` (chosen ``acr``, ``amr``,
login time, ``groups``, other ``claims``) instead of a login page, and the JWT access token carries
``sub``, ``auth_time``, ``acr``, ``amr``, ``groups`` and those claims.

Only stdlib HTTP is used for the provider's endpoints; ``cryptography`` and ``pyjwt`` generate keys
and DPoP proofs.
"""

from __future__ import annotations

import base64
import hashlib
import html
import http.client
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from support import free_port

OP_DIR = Path(__file__).resolve().parent / "op"
SERVER_JS = OP_DIR / "server.js"
SETUP_SCRIPT = ".ci/setup.d/20-oidc-provider.sh"

API_AUDIENCE = "https://api.example.test"
OTHER_AUDIENCE = "https://other.example.test"
OPAQUE_RESOURCE = "https://opaque.example.test"
#: The resource indicator to request for a JWT signed with each algorithm; all have ``aud`` API_AUDIENCE.
RESOURCE_FOR_ALG: dict[str, str] = {
    "ES256": f"{API_AUDIENCE}/es256",
    "RS256": f"{API_AUDIENCE}/rs256",
    "EdDSA": f"{API_AUDIENCE}/eddsa",
}
ALGORITHMS: tuple[str, ...] = tuple(RESOURCE_FOR_ALG)

CLIENT_ID = "app"
CLIENT_SECRET = "app-secret-for-tests-only"
VERIFIER_CLIENT_ID = "verifier"
VERIFIER_CLIENT_SECRET = "verifier-secret-for-tests-only"
DEFAULT_SCOPE = "read write admin"
#: The authorization-code client of user tokens (server.js WEB_CLIENT).
WEB_CLIENT_ID = "web"
WEB_CLIENT_SECRET = "web-secret-for-tests-only"
WEB_REDIRECT_URI = "http://127.0.0.1/callback"
# Redirects to follow from /auth to the code; the flow takes three.
MAX_REDIRECTS = 6

# Seconds; a cold `node` start with oidc-provider takes ~0.5 s, a loaded CI runner much more.
STARTUP_TIMEOUT_S = 20.0
# Seconds for each HTTP call to the provider.
HTTP_TIMEOUT_S = 10.0
# Seconds; long enough for any test, short enough that a leaked token is soon useless.
DEFAULT_ACCESS_TOKEN_TTL_S = 300

# Harness bookkeeping requests carry this header so the provider leaves them out of /__stats.
_UNCOUNTED = {"x-op-harness": "1"}


class ProviderError(RuntimeError):
    """The provider could not be started, or answered a harness request with an error."""


def node_binary() -> str | None:
    """Return the path of ``node`` (``$NODE`` wins), or None when Node.js is not installed."""
    return os.environ.get("NODE") or shutil.which("node")


def _kid(alg: str) -> str:
    return f"{alg.lower()}-{secrets.token_hex(6)}"


def generate_signing_keys() -> list[dict[str, Any]]:
    """Return fresh private JWKs, one per algorithm (ES256, RS256, EdDSA), each with kid, alg, use."""
    keys: list[dict[str, Any]] = []
    for alg in ALGORITHMS:
        if alg == "ES256":
            jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()), as_dict=True)
        elif alg == "RS256":
            rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate(), as_dict=True)
        jwk.update(kid=_kid(alg), alg=alg, use="sig")
        keys.append(jwk)
    return keys


def jwk_thumbprint(public_jwk: dict[str, Any]) -> str:
    """Return the RFC 7638 SHA-256 thumbprint (base64url) of a public EC, RSA or OKP JWK."""
    members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
    required = members[public_jwk["kty"]]
    canonical = json.dumps({k: public_jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def dpop_proof(
    key: ec.EllipticCurvePrivateKey,
    htm: str,
    htu: str,
    *,
    access_token: str | None = None,
    nonce: str | None = None,
    iat: int | None = None,
) -> str:
    """Return a DPoP proof JWT (RFC 9449 section 4.2) signed with an ES256 ``key``.

    With ``access_token`` the proof carries ``ath`` and suits a resource request.
    """
    public_jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    claims: dict[str, Any] = {
        "jti": str(uuid.uuid4()),
        "htm": htm,
        "htu": htu,
        "iat": int(time.time()) if iat is None else iat,
    }
    if access_token is not None:
        digest = hashlib.sha256(access_token.encode("ascii")).digest()
        claims["ath"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    if nonce is not None:
        claims["nonce"] = nonce
    return jwt.encode(claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": public_jwk})


def _basic(client_id: str, client_secret: str) -> str:
    # RFC 6749 section 2.3.1: form-urlencode each part before joining.
    raw = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(client_secret, safe='')}"
    return "Basic " + base64.b64encode(raw.encode()).decode()


def _endpoint(path: str, doc: str) -> property:
    """A read-only attribute: the provider's URL for `path` (below its issuer)."""

    def url(provider: OpenIDProvider) -> str:
        return f"{provider.issuer}{path}"

    return property(url, doc=doc)


class OpenIDProvider:
    """One node-oidc-provider process on a free loopback port, with its keys in ``workdir``.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The issuer is
    ``http://127.0.0.1:<port>``; the port is kept across :meth:`restart`.
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        port: int | None = None,
        access_token_ttl: int = DEFAULT_ACCESS_TOKEN_TTL_S,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        issuer: str | None = None,
        access_token_sid: bool = False,
        introspection_as: str | None = None,
    ) -> None:
        """Prepare (do not start) a provider; ``port`` defaults to a free one picked at :meth:`start`.

        ``issuer`` (e.g. ``http://127.0.0.1:<proxy>/tenant-a``) makes this provider one tenant behind a
        path-prefix proxy (``tenant_proxy.TenantProxy``): it answers under that path, and the harness
        reaches it through the proxy. ``access_token_sid``: user access tokens carry the session's
        ``sid`` (as Keycloak's do; the provider's own JWT access tokens do not). ``introspection_as="keycloak"``:
        active introspection answers name the token's kind as Keycloak's do (`typ` and `token_type`: ``Bearer``, a
        refresh token's ``Refresh``), and a refresh token's names an audience (the grant's resource).
        """
        self.workdir = Path(workdir)
        self.port = port
        self._public_issuer = issuer
        self.access_token_ttl = access_token_ttl
        self.access_token_sid = access_token_sid
        self.introspection_as = introspection_as
        self.backchannel_logout_uri: str | None = None
        self.startup_timeout = startup_timeout
        self.keys_file = self.workdir / "op-private-jwks.json"
        self.config_file = self.workdir / "op-config.json"
        self.log_file = self.workdir / "op.log"
        self._keys: list[dict[str, Any]] = []
        self._signing_kids: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> OpenIDProvider:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True while the node process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Generate keys (first time only), write the config and start node; wait for discovery."""
        node = node_binary()
        if node is None:
            import pytest  # only a test run gets here; keep pytest out of the import path

            pytest.skip("node (Node.js) is not installed; the OpenID Provider harness needs it")
        if not (OP_DIR / "node_modules" / "oidc-provider").is_dir():
            raise ProviderError(
                f"{OP_DIR / 'node_modules'} lacks oidc-provider; run `sh {SETUP_SCRIPT}` from the repo root"
            )
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port()
        if not self._keys:
            self._set_keys(generate_signing_keys())
        self._write_files()
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [node, str(SERVER_JS), str(self.config_file)],
                cwd=OP_DIR,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()

    def stop(self) -> None:
        """Stop the node process (SIGTERM, then SIGKILL after 5 s). Keys and port are kept."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def restart(self) -> None:
        """Stop and start again on the same port with the current keys. In-memory tokens are lost."""
        self.stop()
        self.start()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ProviderError(f"oidc-provider exited with {self._process.returncode}:\n{self._log_tail()}")
            try:
                self.discovery()
                return
            except (OSError, ProviderError):
                time.sleep(0.05)
        self.stop()
        raise ProviderError(f"oidc-provider not ready after {self.startup_timeout} s:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- keys ------------------------------------------------------------------------------

    def _set_keys(self, new_keys: list[dict[str, Any]], retained: list[dict[str, Any]] | None = None) -> None:
        # The signing key of each alg comes first and is named in signing_kids; retained keys are
        # only published, so verifiers can still check tokens signed before the rotation.
        self._keys = new_keys + (retained or [])
        self._signing_kids = {k["alg"]: k["kid"] for k in new_keys}

    def _write_files(self) -> None:
        assert self.port is not None
        self._write_json(self.keys_file, {"keys": self._keys})
        config = {
            "port": self.port,
            "host": "127.0.0.1",
            "keys_file": str(self.keys_file),
            "signing_kids": self._signing_kids,
            "access_token_ttl": self.access_token_ttl,
            "access_token_sid": self.access_token_sid,
            "introspection_as": self.introspection_as,
            "backchannel_logout_uri": self.backchannel_logout_uri,
            **({"issuer": self._public_issuer} if self._public_issuer else {}),
            "clients": [
                {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "scope": DEFAULT_SCOPE},
                {
                    "client_id": VERIFIER_CLIENT_ID,
                    "client_secret": VERIFIER_CLIENT_SECRET,
                    "scope": DEFAULT_SCOPE,
                },
            ],
        }
        self._write_json(self.config_file, config)

    @staticmethod
    def _write_json(path: Path, value: Any) -> None:
        # Write then rename so the provider never reads half a file; private keys stay owner-only.
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(value, fh, indent=1)
        os.replace(tmp, path)

    def rotate_keys(self, *, retain_previous: bool = False, restart: bool = False) -> dict[str, str]:
        """Replace every signing key with a new one and return the new ``{alg: kid}``.

        New tokens are signed with the new keys and the JWKS serves the new kids at once. With
        ``retain_previous`` the old public keys stay in the JWKS (an overlapping rotation);
        otherwise they disappear. By default the running provider reloads its keys in place
        (POST /__reload: same process, same port, issued opaque tokens survive); with
        ``restart=True`` the node process is restarted on the same port instead.
        """
        retained = list(self._keys) if retain_previous else []
        self._set_keys(generate_signing_keys(), retained)
        if not self.running:
            self._write_files()
        elif restart:
            self.restart()
        else:
            self._write_files()
            self._request("POST", "/__reload", headers=_UNCOUNTED)
        return dict(self._signing_kids)

    def set_backchannel_logout_uri(self, uri: str | None) -> None:
        """Give the ``web`` client a Back-Channel Logout 1.0 ``backchannel_logout_uri`` (sid required).

        A running provider reloads in place (its sessions and tokens survive): the verifier's port is
        known only once it runs, and it needs the provider's keys to start.
        """
        self.backchannel_logout_uri = uri
        self._write_files()
        if self.running:
            self._request("POST", "/__reload", headers=_UNCOUNTED)

    def signing_kids(self) -> dict[str, str]:
        """Return ``{alg: kid}`` of the keys that sign new tokens."""
        return dict(self._signing_kids)

    def private_jwks(self) -> dict[str, Any]:
        """Return the private JWKS the provider was given (for tests that forge tokens)."""
        return {"keys": [dict(k) for k in self._keys]}

    def jwks(self) -> dict[str, Any]:
        """Return the public JWKS as served at ``jwks_uri`` (not counted in :meth:`stats`)."""
        return self._json("GET", "/jwks", headers=_UNCOUNTED)

    def kids(self) -> list[str]:
        """Return the kids served at ``jwks_uri`` now, in order (not counted in :meth:`stats`)."""
        return [k["kid"] for k in self.jwks()["keys"]]

    # -- endpoints -------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        """``http://127.0.0.1:<port>``; also the base of every endpoint."""
        if self._public_issuer:
            return self._public_issuer
        if self.port is None:
            raise ProviderError("provider not started")
        return f"http://127.0.0.1:{self.port}"

    discovery_url = _endpoint("/.well-known/openid-configuration", "The OpenID Connect Discovery 1.0 document URL.")
    jwks_uri = _endpoint("/jwks", "The JWKS URL (also in discovery).")
    token_endpoint = _endpoint("/token", "The token endpoint URL (also the ``htu`` of a DPoP proof sent to it).")
    introspection_endpoint = _endpoint("/token/introspection", "The RFC 7662 introspection endpoint URL.")
    revocation_endpoint = _endpoint("/token/revocation", "The RFC 7009 revocation endpoint URL.")

    def discovery(self) -> dict[str, Any]:
        """Return the discovery document (not counted in :meth:`stats`)."""
        return self._json("GET", "/.well-known/openid-configuration", headers=_UNCOUNTED)

    def token_response(
        self,
        *,
        resource: str | None = None,
        alg: str = "ES256",
        scope: str | None = "read write",
        client_id: str = CLIENT_ID,
        client_secret: str = CLIENT_SECRET,
        dpop_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> dict[str, Any]:
        """Run the client-credentials grant and return the token endpoint's JSON answer.

        ``resource`` defaults to the API resource signing with ``alg``. With ``dpop_key`` a
        DPoP proof goes along and the token is bound to that key (``cnf.jkt``, ``token_type`` DPoP).
        Counted in :meth:`stats` as ``token``.
        """
        if resource is None:
            try:
                resource = RESOURCE_FOR_ALG[alg]
            except KeyError:
                raise ValueError(f"alg must be one of {ALGORITHMS}, not {alg!r}") from None
        form = {"grant_type": "client_credentials", "resource": resource}
        if scope:
            form["scope"] = scope
        headers = {"authorization": _basic(client_id, client_secret)}
        if dpop_key is not None:
            headers["dpop"] = dpop_proof(dpop_key, "POST", self.token_endpoint)
        return self._json("POST", "/token", form=form, headers=headers)

    def client_credentials_token(
        self, alg: str = "ES256", scope: str | None = "read write", resource: str | None = None, **client: Any
    ) -> str:
        """Return a JWT access token (``typ: at+jwt``, ``aud`` https://api.example.test) signed with ``alg``.

        ``resource`` overrides the resource indicator (and so ``aud`` and alg; see the module table);
        ``client`` is :meth:`token_response`'s ``client_id``, ``client_secret`` and ``dpop_key``.
        """
        return str(self.token_response(resource=resource, alg=alg, scope=scope, **client)["access_token"])

    def opaque_token(self, scope: str | None = "read write", **client: Any) -> str:
        """Return an opaque access token for https://opaque.example.test (check it by introspection);
        ``client`` as for :meth:`client_credentials_token`."""
        return self.client_credentials_token(scope=scope, resource=OPAQUE_RESOURCE, **client)

    def user_token_response(
        self,
        sub: str = "alice",
        *,
        acr: str | None = "phr",
        amr: list[str] | None = None,
        auth_age_seconds: int = 0,
        scope: str = "read write",
        groups: list[str] | None = None,
        claims: dict[str, Any] | None = None,
        resource: str = API_AUDIENCE,
        dpop_key: ec.EllipticCurvePrivateKey | None = None,
        cookies: dict[str, str] | None = None,
        prompt: str | None = None,
    ) -> dict[str, Any]:
        """Log ``sub`` in and run the authorization-code grant (PKCE); return the token endpoint's JSON.

        The login says ``acr``, ``amr`` (default ``["hwk"]``) and happened ``auth_age_seconds`` ago
        (the token's ``auth_time``); ``groups`` becomes the token's ``groups`` claim, ``claims`` (a
        Keycloak-shaped ``{"realm_access": {"roles": [...]}}``) more claims of the access token. With
        ``dpop_key`` the token is DPoP-bound (``cnf.jkt``). ``openid`` is added to ``scope`` for the
        login; the access token for ``resource`` carries the rest. ``cookies`` (a browser's jar, filled
        here) keeps the provider's session for :meth:`end_session`. ``prompt="consent"`` with
        ``offline_access`` in ``scope`` gets a refresh token too (``refresh_token`` in the answer).
        """
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        state = secrets.token_urlsafe(12)
        query = urllib.parse.urlencode(
            {
                "client_id": WEB_CLIENT_ID,
                "response_type": "code",
                "redirect_uri": WEB_REDIRECT_URI,
                "scope": f"openid {scope}".strip(),
                "resource": resource,
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
                **({"prompt": prompt} if prompt else {}),
            }
        )
        cookies = {} if cookies is None else cookies
        location = self._browse(f"/auth?{query}", cookies)
        uid = urllib.parse.urlsplit(location).path.rstrip("/").rsplit("/", 1)[-1]
        if "/interaction/" not in location:
            raise ProviderError(f"expected a login interaction, got a redirect to {location}")
        login = {
            "accountId": sub,
            "acr": acr,
            "amr": ["hwk"] if amr is None else amr,
            "ts": int(time.time()) - auth_age_seconds,
            "groups": groups,
            "claims": claims,
        }
        body = self._json("POST", f"/__login/{uid}", body=json.dumps(login).encode(), headers=_UNCOUNTED)
        location = str(body["returnTo"])
        for _ in range(MAX_REDIRECTS):
            if location.startswith(WEB_REDIRECT_URI):
                break
            location = self._browse(location, cookies)
        else:
            raise ProviderError(f"no authorization code after {MAX_REDIRECTS} redirects (last {location})")
        answer = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
        if "code" not in answer or answer.get("state") != state:
            raise ProviderError(f"authorization failed: {answer}")
        form = {
            "grant_type": "authorization_code",
            "code": answer["code"],
            "redirect_uri": WEB_REDIRECT_URI,
            "code_verifier": verifier,
            "resource": resource,
        }
        headers = {"authorization": _basic(WEB_CLIENT_ID, WEB_CLIENT_SECRET)}
        if dpop_key is not None:
            headers["dpop"] = dpop_proof(dpop_key, "POST", self.token_endpoint)
        return self._json("POST", "/token", form=form, headers=headers)

    def user_token(self, sub: str = "alice", **login: Any) -> str:
        """Return a user's JWT access token (``sub``, ``auth_time``, ``acr``, ``amr``); ``login`` is
        :meth:`user_token_response`'s keywords."""
        return str(self.user_token_response(sub, **login)["access_token"])

    def end_session(self, cookies: dict[str, str]) -> None:
        """RP-initiated logout as a browser does it: the end_session_endpoint's confirmation form, posted.

        With a ``backchannel_logout_uri`` set the provider posts its logout token there before it
        answers (see ``BACKCHANNEL_OK`` / ``BACKCHANNEL_ERROR`` in :meth:`log_text`).
        """
        endpoint = urllib.parse.urlsplit(str(self.discovery()["end_session_endpoint"])).path
        status, page, _ = self._send("GET", endpoint, cookies)
        form = re.search(rb'<form id="op.logoutForm" method="post" action="([^"]+)">', page)
        xsrf = re.search(rb'name="xsrf" value="([^"]+)"', page)
        if status != 200 or form is None or xsrf is None:
            raise ProviderError(f"GET {endpoint} -> {status}: no logout form in {page[:300]!r}")
        confirm = urllib.parse.urlsplit(html.unescape(form.group(1).decode())).path
        body = urllib.parse.urlencode({"xsrf": html.unescape(xsrf.group(1).decode()), "logout": "yes"})
        status, page, _ = self._send("POST", confirm, cookies, body.encode())
        if status not in (302, 303):
            raise ProviderError(f"POST {confirm} -> {status}: {page[:300]!r}")

    def log_text(self) -> str:
        """The provider's stdout and stderr so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def _send(
        self, method: str, path: str, cookies: dict[str, str], form: bytes | None = None
    ) -> tuple[int, bytes, str | None]:
        """One browser request with the cookie jar (updated from Set-Cookie); no redirect followed."""
        assert self.port is not None
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT_S)
        try:
            headers = {"cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
            if form is not None:
                headers["content-type"] = "application/x-www-form-urlencoded"
            conn.request(method, path, body=form, headers=headers)
            response = conn.getresponse()
            body = response.read()
            for name, value in response.getheaders():
                if name.lower() == "set-cookie":
                    key, _, val = value.split(";", 1)[0].partition("=")
                    cookies[key.strip()] = val.strip()
            return response.status, body, response.getheader("location")
        finally:
            conn.close()

    def _browse(self, target: str, cookies: dict[str, str]) -> str:
        """GET ``target`` as a browser would (keeping cookies, not following); return the redirect."""
        parts = urllib.parse.urlsplit(target)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        status, body, location = self._send("GET", path, cookies)
        if status not in (302, 303) or not location:
            raise ProviderError(f"GET {parts.path} -> {status}: {body[:500].decode(errors='replace')}")
        return urllib.parse.urljoin(self.issuer + path, location)

    def introspect(
        self,
        token: str,
        *,
        client_id: str = VERIFIER_CLIENT_ID,
        client_secret: str = VERIFIER_CLIENT_SECRET,
        counted: bool = False,
    ) -> dict[str, Any]:
        """Introspect ``token`` as the ``verifier`` client; left out of :meth:`stats` unless ``counted``."""
        headers = {"authorization": _basic(client_id, client_secret)}
        if not counted:
            headers.update(_UNCOUNTED)
        return self._json("POST", "/token/introspection", form={"token": token}, headers=headers)

    def revoke(self, token: str, *, token_type_hint: str | None = "access_token") -> None:
        """Revoke ``token`` (RFC 7009) as the ``verifier`` client; later introspection says inactive."""
        form = {"token": token}
        if token_type_hint:
            form["token_type_hint"] = token_type_hint
        headers = {"authorization": _basic(VERIFIER_CLIENT_ID, VERIFIER_CLIENT_SECRET), **_UNCOUNTED}
        self._request("POST", "/token/revocation", form=form, headers=headers)

    # -- test controls ---------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Return requests served per endpoint: discovery, jwks, token, introspection, revocation,
        authorization, other, total (since start or :meth:`reset_stats`), and reloads.

        The harness's own calls are left out, except :meth:`token_response` and its wrappers.
        """
        return {k: int(v) for k, v in self._json("GET", "/__stats").items()}

    def reset_stats(self) -> None:
        """Zero the request counts."""
        self._request("POST", "/__stats/reset")

    def set_fault(self, endpoint: str, *, status: int | None = None, delay_ms: int = 0) -> None:
        """Make ``endpoint`` (a :meth:`stats` key, e.g. ``jwks``) answer ``status`` and/or wait ``delay_ms``.

        Replaces any earlier faults; :meth:`clear_faults` removes them.
        """
        fault: dict[str, int] = {"delay_ms": delay_ms}
        if status is not None:
            fault["status"] = status
        self._request("POST", "/__faults", body=json.dumps({endpoint: fault}).encode())

    def clear_faults(self) -> None:
        """Answer every endpoint normally again."""
        self._request("POST", "/__faults", body=b"{}")

    # -- HTTP ------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        form: dict[str, str] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        all_headers = dict(headers or {})
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            all_headers["content-type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            all_headers["content-type"] = "application/json"
        request = urllib.request.Request(self.issuer + path, data=body, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise ProviderError(f"{method} {path} -> {err.code}: {detail}") from None

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        _, body = self._request(method, path, **kwargs)
        value = json.loads(body)
        if not isinstance(value, dict):
            raise ProviderError(f"{method} {path}: expected a JSON object")
        return value


def start_provider(tmp_path_factory: Any, **options: Any) -> OpenIDProvider:
    """Start a provider in a fresh pytest temp dir and return it; the caller must stop it.

    Skips the test (pytest.skip) when node is missing; raises ProviderError when node_modules is.
    Example fixture::

        @pytest.fixture(scope="module")
        def oidc_provider(tmp_path_factory):
            op = start_provider(tmp_path_factory)
            yield op
            op.stop()
    """
    provider = OpenIDProvider(tmp_path_factory.mktemp("oidc-provider"), **options)
    provider.start()
    return provider
