"""Large but legitimate credentials through every shipped gateway: what the verifier accepts, the gateway carries.

The verifier reads a token up to `max_token_bytes` (8 KiB) and a DPoP proof up to `dpop.max_proof_bytes` (8 KiB),
and a forward-auth request's header block up to 32 KiB (verifier/doors/forward_auth.py MAX_HEADER_BYTES; past it
431). nginx reads each client header line into one of its `large_client_header_buffers` (4 8k by default), so an
`Authorization: Bearer <8 KiB token>` line (8,214 bytes) was nginx's own 400 before the verifier was asked: a
token the verifier accepts never reached it through our nginx templates. And a header block the verifier
refused (431, no reason) became nginx's fail-closed 503, an outage to the client, not the refusal it is.

Through every shipped configuration (nginx, nginx-lua, Envoy gRPC / HTTP / reuse; the Kong Lua and Python plugins'
rigs run these same tests, tests/kong/test_credential_size_lua.py and test_credential_size_python.py):
- a token of exactly the bound passes, and so does a DPoP-bound one of the bound with a proof of its bound;
- one byte over is the verifier's 401 `invalid_token`, never a gateway's 400 or a pass;
- a request whose headers come near 32 KiB passes (the credential judged), and one past the verifier's or the
  gateway's header bound is a 4xx (431, or nginx's own 400), never a 5xx, a hang or a pass.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from base64 import urlsafe_b64encode
from collections.abc import Callable, Iterator

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from verifier.binding.dpop import thumbprint
from verifier.config.dpop import DEFAULT_MAX_PROOF_BYTES
from verifier.doors.forward_auth import MAX_HEADER_BYTES
from verifier.settings import DEFAULT_MAX_TOKEN_BYTES

if __package__:
    from .gateways import GATEWAY_KINDS, EchoUpstream, GatewayProcess, LocalIssuer, http_request, start_verifier
    from .replicas import public_jwk
    from .test_trust_boundary import API_HOST, Edge
else:  # tests/ is not a package: pytest put this directory on sys.path
    from gateways import GATEWAY_KINDS, EchoUpstream, GatewayProcess, LocalIssuer, http_request, start_verifier
    from replicas import public_jwk
    from test_trust_boundary import API_HOST, Edge

from rigs import fresh_upstream_log, gateway_fixture  # noqa: F401 - autouse: each test sees only its own requests

pytestmark = pytest.mark.integration

TOKEN_BOUND = DEFAULT_MAX_TOKEN_BYTES  # the verifier's default max_token_bytes
PROOF_BOUND = DEFAULT_MAX_PROOF_BYTES  # its default dpop.max_proof_bytes


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = start_verifier(tmp_path_factory.mktemp("credential-size"), issuer=issuer.issuer)
    yield proc
    proc.stop()


edge = gateway_fixture("edge", GATEWAY_KINDS, lambda kind, url: Edge(name=kind, url=url))


def of_length(make: Callable[[int], str], size: int) -> str:
    """`make(padding)` for the padding whose result is exactly `size` characters long (base64url cannot give
    every length: then one short of it)."""
    pad = 0
    for _ in range(64):
        got = len(make(pad))
        if got in (size, size - 1):
            break
        pad = max(0, pad + (size - got) * 3 // 4 or (1 if got < size else -1))
    for tweak in (0, 1, -1, 2, -2):  # the exact length, when some padding near this one gives it
        candidate = make(max(0, pad + tweak))
        if len(candidate) == size:
            return candidate
    candidate = make(pad)
    assert len(candidate) in (size, size - 1), (len(candidate), size)
    return candidate


def token_of(issuer: LocalIssuer, size: int, **claims: object) -> str:
    """A valid token of `size` characters (a padding claim the verifier ignores)."""
    return of_length(lambda n: issuer.mint(pad="p" * n, **claims), size)


def proof_of(key: ec.EllipticCurvePrivateKey, size: int, method: str, url: str, token: str) -> str:
    """A valid RFC 9449 proof for `method url` bound to `token`, `size` characters long."""
    ath = urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()
    jti, iat = uuid.uuid4().hex, int(time.time())

    def make(n: int) -> str:
        claims = {"jti": jti, "htm": method, "htu": url, "iat": iat, "ath": ath, "pad": "p" * n}
        return jwt.encode(claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": public_jwk(key)})

    return of_length(make, size)


def cookies_of(total: int, line: int = 6000) -> dict[str, str]:
    """Cookie-like headers of about `total` bytes in all, none of them over `line` bytes."""
    headers, n = {}, 0
    while total > 0:
        value = "c" * min(line, total)
        headers[f"X-Big-{n}"] = value
        total -= len(value) + len(f"X-Big-{n}: \r\n")
        n += 1
    return headers


def test_a_token_of_exactly_the_verifiers_bound_passes(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    token = token_of(issuer, TOKEN_BOUND)
    assert len(token) == TOKEN_BOUND

    r = http_request(f"{edge.url}/orders/1", headers={"Authorization": f"Bearer {token}"})

    assert r.status == 200, (edge.name, r.status, r.headers, r.body[:300])
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == "alice"


def test_a_dpop_bound_token_of_the_bound_passes_with_a_proof_of_its_bound(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = token_of(issuer, TOKEN_BOUND, cnf={"jkt": thumbprint(public_jwk(key))})
    scheme = edge.url.split("://", 1)[0]
    proof = proof_of(key, PROOF_BOUND, "GET", f"{scheme}://{API_HOST}:{edge.port}/orders/1", token)
    assert len(token) == TOKEN_BOUND and len(proof) in (PROOF_BOUND, PROOF_BOUND - 1)

    r = http_request(
        f"{edge.url}/orders/1",
        headers={"Host": f"{API_HOST}:{edge.port}", "Authorization": f"DPoP {token}", "DPoP": proof},
    )

    assert r.status == 200, (edge.name, r.status, r.headers, r.body[:300])
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == "alice"


def test_a_token_one_byte_over_the_bound_is_the_verifiers_401_not_the_gateways(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    token = token_of(issuer, TOKEN_BOUND + 1)
    assert len(token) == TOKEN_BOUND + 1

    r = http_request(f"{edge.url}/orders/1", headers={"Authorization": f"Bearer {token}"})

    assert r.status == 401, (edge.name, r.status, r.headers, r.body[:300])
    assert 'error="invalid_token"' in r.headers.get("www-authenticate", ""), (edge.name, r.headers)
    assert r.headers.get("x-verifier-reason"), (edge.name, r.headers)
    assert upstream.requests == []


def test_headers_near_the_verifiers_header_bound_still_reach_a_decision(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    """An 8 KiB token and other headers, about 30 KiB in all: under the verifier's 32 KiB with what the gateway
    adds, so judged and passed."""
    token = token_of(issuer, TOKEN_BOUND)
    headers = {"Authorization": f"Bearer {token}", **cookies_of(MAX_HEADER_BYTES - 2048 - len(token))}
    assert 29 * 1024 < sum(len(k) + len(v) + 4 for k, v in headers.items()) < MAX_HEADER_BYTES - 1024

    r = http_request(f"{edge.url}/orders/1", headers=headers)

    assert r.status == 200, (edge.name, r.status, r.headers, r.body[:300])
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == "alice"


#: What each gateway answers a valid token with a header block past the verifier's 32 KiB (its extra headers under
#: 16 KiB a line), and past 64 KiB: a 4xx, or for a gateway that asks the verifier about the credential headers
#: only (Envoy HTTP mode and reuse filter, the Kong plugins) a pass judged on the token, within its own bound
#: (Envoy's max_request_headers_kb, 60 KiB; nginx's and Kong's large_client_header_buffers 4 16k, nginx's 400).
PAST_THE_HEADER_BOUND = {
    "nginx": (431, 400),
    "nginx-lua": (431, 400),
    "envoy-grpc": (200, 431),
    "envoy-http": (200, 431),
    "envoy-reuse": (200, 431),
    "kong-lua": (200, 400),
    "kong-python": (200, 400),
}
#: ... and past the verifier's 128 header fields: nginx relays the verifier's 431, Envoy answers its own past 100
#: fields, the Kong plugins read up to 1,000 and send the verifier the credential headers only.
PAST_THE_FIELD_BOUND = {"kong-lua": 200, "kong-python": 200}


@pytest.mark.parametrize("extra", [MAX_HEADER_BYTES, 2 * MAX_HEADER_BYTES])
def test_headers_past_the_bound_are_a_4xx_never_a_5xx(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer, extra: int
) -> None:
    """Past 32 KiB: a request-header refusal (431, or nginx's 400), from the gateway or the verifier's relayed,
    never a 503 that reads as an outage, nor a pass the verifier did not judge."""
    headers = {"Authorization": f"Bearer {token_of(issuer, 1024)}", **cookies_of(extra)}

    r = http_request(f"{edge.url}/orders/1", headers=headers)

    expected = PAST_THE_HEADER_BOUND[edge.name][extra > MAX_HEADER_BYTES]
    assert r.status == expected, (edge.name, extra, r.status, r.headers, r.body[:300])
    assert len(upstream.requests) == (r.status == 200)
    if r.status == 200:
        assert upstream.requests[0].headers["x-authenticated-userid"] == "alice"


def test_more_header_fields_than_the_verifier_reads_are_a_431_never_a_5xx(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    """150 small header fields (4 KiB): past the verifier's 128 fields (its 431; nginx has no count of its own, and
    made that 431 its fail-closed 503), past Envoy's 100 (Envoy's own 431)."""
    headers = {"Authorization": f"Bearer {issuer.mint()}", **{f"X-Field-{i}": "v" for i in range(150)}}

    r = http_request(f"{edge.url}/orders/1", headers=headers)

    assert r.status == PAST_THE_FIELD_BOUND.get(edge.name, 431), (edge.name, r.status, r.headers, r.body[:300])
    assert len(upstream.requests) == (r.status == 200)


#: A token far past the bound (40 KiB, on one header line): nginx's and Kong's 400 (the line is past one 16 KiB
#: buffer), the verifier's 401 through Envoy's gRPC mode, its 431 (the header block past 32 KiB) through Envoy's HTTP
#: mode and reuse filter.
FAR_PAST_THE_TOKEN_BOUND = {
    "nginx": 400,
    "nginx-lua": 400,
    "envoy-grpc": 401,
    "envoy-http": 431,
    "envoy-reuse": 431,
    "kong-lua": 400,
    "kong-python": 400,
}


def test_a_token_far_past_the_bound_is_a_4xx_never_a_5xx(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    token = token_of(issuer, 40 * 1024)

    r = http_request(f"{edge.url}/orders/1", headers={"Authorization": f"Bearer {token}"})

    assert r.status == FAR_PAST_THE_TOKEN_BOUND[edge.name], (edge.name, r.status, r.headers, r.body[:300])
    assert upstream.requests == []
