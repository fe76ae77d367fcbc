"""A client of a shipped gateway never reaches the verifier's admin API (the kill switch on the HTTP listener).

The admin routes (`/v1/admin/revocations`) share the forward-auth listener. Every shipped gateway talks to that
listener: nginx's auth_request and Envoy's ext_authz HTTP mode for checks (Envoy appending the client's path to
`/v1/forward-auth`, with the client's method), and both pass `/.well-known/oauth-protected-resource` to it
unauthenticated. The attacker here sends the admin API's methods and paths through them, directly and by every
spelling that climbs out of those locations (dot segments, encoded dots and slashes), with the real admin
token and with a guess. Reached, the API would answer (201, 200 with the entries) or audit a refusal
(`admin_refused`): neither may happen, and no entry may appear.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator

import pytest
from gateways import LOOPBACK, GatewayProcess, LocalIssuer, start_verifier
from rigs import fresh_upstream_log, gateway_fixture  # noqa: F401 - autouse: each test sees only its own requests

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "the-admin-token-of-the-gateway-admin-tests-0123"
GUESS = "not-the-admin-token-but-long-enough-0123456789"
API_HOST = "api.example.test"
ADMIN_HOST = "admin.example.test"
COLLECTION = "/v1/admin/revocations"
METADATA = "/.well-known/oauth-protected-resource"
# The collection, and climbs out of the locations the gateways pass to the verifier.
TARGETS = (
    COLLECTION,
    f"{COLLECTION}/op-x",
    f"/v1/forward-auth/..{COLLECTION[3:]}",  # /v1/admin/revocations once the dot segment is resolved
    f"/v1/forward-auth/%2e%2e{COLLECTION[3:]}",
    f"{METADATA}/../..{COLLECTION}",
    f"{METADATA}/%2e%2e/%2e%2e{COLLECTION}",
    f"{METADATA}/..%2f..%2fv1%2fadmin%2frevocations",
    f"{METADATA}%2f..%2f..{COLLECTION}",
    f"{METADATA}/..;/..;{COLLECTION}",
    # What a gateway may read differently from the verifier: a raw `#` or `?` ending its path, doubled or
    # upper-case or `;`-parameter spellings, an encoded slash, and absolute-form targets naming another host.
    f"{METADATA}#/../..{COLLECTION}",
    f"{METADATA}?/../..{COLLECTION}",
    f"/v1/forward-auth#/../..{COLLECTION}",
    f"/{COLLECTION}",
    COLLECTION.upper(),
    f"{COLLECTION};x=y",
    "/v1/admin%2frevocations",
    f"http://{API_HOST}{COLLECTION}",
    f"http://127.0.0.1{COLLECTION}",
)
BODY = json.dumps({"subject": {"format": "iss_sub", "iss": "https://idp.example.test", "sub": "victim"}})


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = start_verifier(
        tmp_path_factory.mktemp("verifier"),
        issuer=issuer.issuer,
        extra_config={"revocation": {"transmitters": []}},  # the kill switch alone
        environment={"VERIFIER_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    yield proc
    proc.stop()


edge = gateway_fixture("edge")  # each shipped gateway in front of `verifier`


def send(url: str, method: str, target: str, host: str, token: str) -> tuple[int, bytes]:
    """`method target` byte for byte (no client library resolves its dot segments), with a JSON body on a POST."""
    body = BODY.encode() if method == "POST" else b""
    head = [
        f"{method} {target} HTTP/1.1",
        f"Host: {host}",
        f"Authorization: Bearer {token}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    with socket.create_connection((LOOPBACK, int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall("\r\n".join(head).encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line = data.split(b"\r\n", 1)[0].split()
    assert len(status_line) >= 2, data
    return int(status_line[1]), data.partition(b"\r\n\r\n")[2]


def admin_entries(verifier: GatewayProcess) -> list[object]:
    """The kill switch's entries, asked directly (the operator's own path to it)."""
    request = urllib.request.Request(
        f"{verifier.url}{COLLECTION}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        entries: list[object] = json.loads(answer.read())["entries"]
        return entries


def admin_log_lines(verifier: GatewayProcess) -> list[str]:
    return [
        line for line in verifier.log_path.read_text(errors="replace").splitlines()
        if '"admin_refused"' in line or '"revocation_created"' in line or '"revocation_lifted"' in line
    ]


def test_the_admin_api_answers_its_operator_directly(verifier: GatewayProcess) -> None:
    """The rig's own check: the API is there, so what the gateways do not pass is not missing."""
    assert admin_entries(verifier) == []


@pytest.mark.parametrize("token", [ADMIN_TOKEN, GUESS], ids=["admin-token", "guess"])
@pytest.mark.parametrize("host", [API_HOST, ADMIN_HOST])
def test_a_client_of_the_gateway_never_reaches_the_admin_api(
    edge: str, verifier: GatewayProcess, host: str, token: str
) -> None:
    before = admin_log_lines(verifier)
    for method in ("GET", "POST", "DELETE"):
        for target in TARGETS:
            status, body = send(edge, method, target, host, token)
            assert b'"entries"' not in body and not (status == 201 and b'"id"' in body), (method, target, status)
            assert status != 204, (method, target)
    assert admin_log_lines(verifier) == before, "a client's request reached the admin API"
    assert admin_entries(verifier) == []
