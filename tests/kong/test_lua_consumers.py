"""Kong consumers through the Lua plugin (issue #20), in real nginx under the PDK shim.

The verifier names the consumer in its allow answer (`upstream.consumer` in the verifier's config):
`X-Kong-Consumer-Username` or `X-Kong-Consumer-Custom-Id`. The stand-in forward-auth server answers
with those headers (`Bearer username=NAME`, `Bearer custom_id=VALUE`); the shim's datastore holds the
consumer entities and their consumer groups, and the rig runs what Kong's acl (by consumer group) and
rate-limiting (by consumer) do after the plugin, so these tests see what those plugins see.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Any

import pytest
from test_lua_plugin import call, shim_json, upstream_saw

pytestmark = pytest.mark.integration

ALICE = {
    "id": "6f1b5b0e-4a4e-4c53-9a58-2b1f6a0e7c11",
    "username": "alice",
    "custom_id": "cust-9",
    "groups": ["readers"],
}
CAROL = {"id": "c0c0c0c0-1111-4222-8333-444455556666", "username": "carol", "groups": ["guests"]}
GUEST = {"id": "9e9e9e9e-0000-4000-8000-00000000a000", "username": "guest", "groups": ["anonymous-readers"]}
BOB = {"id": "0b0b0b0b-0000-4000-8000-000000000001", "username": "bob", "groups": ["admins"]}
CONSUMERS = [ALICE, CAROL, GUEST]
# The upstream headers Kong authenticators set, and acl's; a client sending them claims to be a consumer.
SPOOFED = {
    "X-Consumer-ID": "0000",
    "X-Consumer-Username": "root",
    "X-Consumer-Custom-ID": "root-custom",
    "X-Credential-Identifier": "root-credential",
    "X-Anonymous-Consumer": "false",
    "X-Consumer-Groups": "admins",
    "X-Kong-Consumer-Username": "root",
}
REFUSED = {"message": "The verified identity is not a known consumer"}


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def consumer_headers(body: bytes) -> dict[str, list[str]]:
    """The consumer headers the upstream received."""
    h = upstream_saw(body)["h"]
    return {k: v for k, v in h.items() if k.startswith(("x-consumer-", "x-credential-", "x-anonymous-"))}


def update_consumer(base: str, entity: dict[str, Any]) -> None:
    """An Admin API change to one consumer, with the "crud" event every worker gets."""
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    try:
        conn.request("POST", "/__shim/consumers", body=json.dumps(entity))
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def authenticated(base: str) -> list[dict[str, Any]]:
    return list(shim_json(base, "authenticated")["calls"])


# --------------------------------------------------------------------------- found


@pytest.mark.parametrize("token", ["username=alice", "custom_id=cust-9"])
def test_the_named_consumer_is_authenticated_with_the_usual_upstream_headers(
    start_nginx, echo_upstream, standin_verifier, token
):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS)

    status, _, body = call(base, headers=bearer(token, **SPOOFED))

    assert status == 200
    assert consumer_headers(body) == {
        "x-consumer-id": [ALICE["id"]],
        "x-consumer-username": ["alice"],
        "x-consumer-custom-id": ["cust-9"],
        "x-credential-identifier": ["user-1"],
    }
    (c,) = authenticated(base)
    assert c["consumer"] == {"id": ALICE["id"], "username": "alice", "custom_id": "cust-9"}
    assert c["credential"] == {"id": "user-1", "consumer_id": ALICE["id"]}
    # the verifier's naming headers are for the plugin, not the upstream
    assert not [k for k in upstream_saw(body)["h"] if k.startswith("x-kong-")]


def test_a_consumer_without_custom_id_gets_no_client_custom_id(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS)

    status, _, body = call(base, headers=bearer("username=carol", **SPOOFED))

    assert status == 200
    assert consumer_headers(body) == {
        "x-consumer-id": [CAROL["id"]],
        "x-consumer-username": ["carol"],
        "x-credential-identifier": ["user-1"],
    }


def test_an_identity_without_a_user_id_authenticates_the_consumer_without_a_credential(
    start_nginx, echo_upstream, standin_verifier
):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS)

    status, _, body = call(base, headers=bearer("client-username=alice", **SPOOFED))

    assert status == 200
    h = consumer_headers(body)
    assert h["x-consumer-username"] == ["alice"]
    assert "x-credential-identifier" not in h
    assert "x-anonymous-consumer" not in h  # a verified consumer, not the anonymous one
    (c,) = authenticated(base)
    assert c["credential"] is None


def test_consumers_are_read_from_kongs_cache_after_the_first_request(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS)

    for token in ["username=alice", "username=alice", "custom_id=cust-9", "custom_id=cust-9", "username=nobody"] * 2:
        call(base, headers=bearer(token))

    # one read per name; a name Kong does not know is remembered too
    assert shim_json(base, "db")["selects"] == 3


def test_a_changed_custom_id_no_longer_finds_the_consumer(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS)
    assert call(base, headers=bearer("custom_id=cust-9"))[0] == 200
    assert call(base, headers=bearer("custom_id=cust-10"))[0] == 403  # remembered as unknown

    update_consumer(base, {**ALICE, "custom_id": "cust-10"})

    assert call(base, headers=bearer("custom_id=cust-9"))[0] == 403
    status, _, body = call(base, headers=bearer("custom_id=cust-10"))
    assert status == 200
    assert consumer_headers(body)["x-consumer-username"] == ["alice"]


def test_a_renamed_consumer_is_found_by_its_new_username_only(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS)
    assert call(base, headers=bearer("username=alice"))[0] == 200

    update_consumer(base, {**ALICE, "username": "alice2"})

    assert call(base, headers=bearer("username=alice"))[0] == 403
    assert call(base, headers=bearer("username=alice2"))[0] == 200


# --------------------------------------------------------------------------- not found


def test_an_unknown_consumer_is_refused_by_default(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS)

    status, _, body = call(base, headers=bearer("username=mallory"))

    assert status == 403
    assert json.loads(body) == REFUSED  # and not the echo upstream's JSON: the request never got there
    assert authenticated(base) == []
    assert "username 'mallory', which Kong does not know: refused" in start_nginx.error_log_text()


@pytest.mark.parametrize("anonymous", [GUEST["id"], GUEST["username"]])
def test_an_unknown_consumer_passes_as_the_anonymous_consumer_when_configured(
    start_nginx, echo_upstream, standin_verifier, anonymous
):
    conf = {"url": standin_verifier.url, "consumer_not_found": "anonymous", "anonymous": anonymous}
    base = start_nginx(conf, echo_upstream, consumers=CONSUMERS)

    status, _, body = call(base, headers=bearer("username=mallory", **SPOOFED))

    assert status == 200
    assert consumer_headers(body) == {
        "x-consumer-id": [GUEST["id"]],
        "x-consumer-username": ["guest"],
        "x-anonymous-consumer": ["true"],
    }
    assert upstream_saw(body)["h"]["x-authenticated-userid"] == ["user-1"]
    (c,) = authenticated(base)
    assert c["consumer"]["username"] == "guest"
    assert c["credential"] is None


def test_a_configured_anonymous_consumer_that_does_not_exist_fails_closed(start_nginx, echo_upstream, standin_verifier):
    conf = {"url": standin_verifier.url, "consumer_not_found": "anonymous", "anonymous": "ghost"}
    base = start_nginx(conf, echo_upstream, consumers=CONSUMERS)

    status, _, body = call(base, headers=bearer("username=mallory"))

    assert status == 500
    assert json.loads(body) == {"message": "An unexpected error occurred"}
    assert "anonymous consumer 'ghost' is configured but doesn't exist" in start_nginx.error_log_text()


def test_an_identity_that_names_no_consumer_passes_without_one(start_nginx, echo_upstream, standin_verifier):
    # without `upstream.consumer` the verifier names none: identity headers only, as before #20
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS)

    status, _, body = call(base, headers=bearer("good", **SPOOFED))

    assert status == 200
    assert consumer_headers(body) == {}
    (c,) = authenticated(base)
    assert c["consumer"] is None and c["credential"] == {"id": "user-1"}


def test_a_client_token_naming_no_consumer_authenticates_nothing(start_nginx, echo_upstream, standin_verifier):
    # an empty X-Authenticated-Userid must not become a Kong credential with an empty id
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS)

    status, _, body = call(base, headers=bearer("client", **SPOOFED))

    assert status == 200
    assert consumer_headers(body) == {}
    assert authenticated(base) == []


# --------------------------------------------------------------------------- earlier authenticators


def test_the_consumer_of_an_earlier_authenticator_is_kept_when_none_is_named(
    start_nginx, echo_upstream, standin_verifier
):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, preauthenticated=BOB)

    status, _, body = call(base, headers=bearer("good"))

    assert status == 200
    assert consumer_headers(body)["x-consumer-username"] == ["bob"]
    assert upstream_saw(body)["h"]["x-authenticated-userid"] == ["user-1"]
    assert len(authenticated(base)) == 1  # the earlier authenticator's call only


def test_the_named_consumer_replaces_an_earlier_one_and_its_groups(start_nginx, echo_upstream, standin_verifier):
    # Kong's authenticate keeps consumer groups already set: bob's "admins" must not stick to alice
    base = start_nginx(
        {"url": standin_verifier.url},
        echo_upstream,
        consumers=CONSUMERS,
        preauthenticated=BOB,
        later={"acl": {"allow": ["admins"]}},
    )

    status, _, body = call(base, headers=bearer("username=alice"))

    assert status == 403
    assert json.loads(body) == {"message": "You cannot consume this service"}
    (seen,) = shim_json(base, "later")["seen"]
    assert seen["consumer"]["username"] == "alice"
    assert [g["name"] for g in seen["groups"]] == ["readers"]


# --------------------------------------------------------------------------- attacks


def test_a_subject_equal_to_another_consumers_id_does_not_become_that_consumer(
    start_nginx, echo_upstream, standin_verifier
):
    # kong.client.load_consumer(name, true) tries a UUID as an id first
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS)

    status, _, body = call(base, headers=bearer(f"username={ALICE['id']}"))

    assert status == 403
    assert json.loads(body) == REFUSED
    assert authenticated(base) == []


def test_a_subject_equal_to_a_consumer_id_kong_cached_by_id_does_not_become_that_consumer(
    start_nginx, echo_upstream, standin_verifier
):
    # the anonymous consumer, loaded by id, sits in Kong's cache under the key a username lookup uses
    conf = {"url": standin_verifier.url, "consumer_not_found": "anonymous", "anonymous": CAROL["id"]}
    base = start_nginx(conf, echo_upstream, consumers=CONSUMERS)
    assert call(base, headers=bearer("username=mallory"))[0] == 200  # caches carol under her id

    status, _, body = call(base, headers=bearer(f"username={CAROL['id']}"))

    assert status == 200
    h = consumer_headers(body)
    assert h["x-consumer-username"] == ["carol"]
    assert h["x-anonymous-consumer"] == ["true"]  # the anonymous fallback, not carol authenticated
    assert "x-credential-identifier" not in h


def test_a_subject_equal_to_a_consumer_id_does_not_poison_kongs_cache_entry_for_that_id(
    start_nginx, echo_upstream, standin_verifier
):
    # Kong keeps consumers by id under consumers:cache_key(id) (its authenticators, `anonymous` by id):
    # a username lookup remembered there as "not found" would make that consumer vanish for all of them
    conf = {"url": standin_verifier.url, "consumer_not_found": "anonymous", "anonymous": GUEST["id"]}
    base = start_nginx(conf, echo_upstream, consumers=CONSUMERS)

    first = call(base, headers=bearer(f"username={GUEST['id']}"))
    then = call(base, headers=bearer("username=mallory"))

    for status, _, body in (first, then):
        assert status == 200
        assert consumer_headers(body)["x-anonymous-consumer"] == ["true"]
        assert consumer_headers(body)["x-consumer-id"] == [GUEST["id"]]


@pytest.mark.parametrize("token", ["both", "twice"])
def test_an_answer_naming_more_than_one_consumer_fails_closed(start_nginx, echo_upstream, standin_verifier, token):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, consumers=[*CONSUMERS, BOB])

    status, _, body = call(base, headers=bearer(token))

    assert status == 500
    assert json.loads(body) == {"message": "An unexpected error occurred"}
    assert authenticated(base) == []
    assert "names more than one consumer" in start_nginx.error_log_text()


def test_client_consumer_groups_never_reach_the_upstream(start_nginx, echo_upstream, standin_verifier):
    # acl sets X-Consumer-Groups after this plugin; without acl a client's copy would pass as checked groups
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS)

    for token in ["good", "username=alice"]:
        status, _, body = call(
            base, headers=bearer(token, **{"X-Consumer-Groups": "admins", "x_consumer_groups": "admins"})
        )
        assert status == 200
        assert "x-consumer-groups" not in upstream_saw(body)["h"]


def test_client_consumer_headers_never_reach_the_upstream_without_a_consumer(
    start_nginx, echo_upstream, standin_verifier
):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    status, _, body = call(base, headers=bearer("good", **SPOOFED))

    assert status == 200
    assert consumer_headers(body) == {}


# --------------------------------------------------------------------------- the plugins after ours


def test_acl_by_consumer_group_sees_the_named_consumer(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx(
        {"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS, later={"acl": {"allow": ["readers"]}}
    )

    allowed = call(base, headers=bearer("username=alice"))
    refused = call(base, headers=bearer("username=carol"))
    nobody = call(base, headers=bearer("client"))

    assert allowed[0] == 200
    assert upstream_saw(allowed[2])["h"]["x-consumer-groups"] == ["readers"]
    assert refused[0] == 403
    assert json.loads(refused[2]) == {"message": "You cannot consume this service"}
    assert nobody[0] == 401  # no consumer and no credential: acl cannot tell who it is
    seen = shim_json(base, "later")["seen"]
    assert [s["consumer"]["username"] if s["consumer"] else None for s in seen] == ["alice", "carol", None]


def test_acl_lets_the_anonymous_consumer_in_by_its_groups(start_nginx, echo_upstream, standin_verifier):
    conf = {"url": standin_verifier.url, "consumer_not_found": "anonymous", "anonymous": "guest"}
    base = start_nginx(conf, echo_upstream, consumers=CONSUMERS, later={"acl": {"allow": ["anonymous-readers"]}})

    status, _, body = call(base, headers=bearer("username=mallory"))

    assert status == 200
    h = upstream_saw(body)["h"]
    assert h["x-consumer-groups"] == ["anonymous-readers"]
    assert h["x-anonymous-consumer"] == ["true"]


def test_rate_limiting_by_consumer_counts_each_named_consumer(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx(
        {"url": standin_verifier.url}, echo_upstream, consumers=CONSUMERS, later={"rate_limiting": {"minute": 2}}
    )

    alice = [call(base, headers=bearer(t))[0] for t in ["username=alice", "custom_id=cust-9", "username=alice"]]
    carol = call(base, headers=bearer("username=carol"))[0]

    assert alice == [200, 200, 429]  # one consumer, however the verifier names it
    assert carol == 200
    seen = shim_json(base, "later")["seen"]
    assert [s["rate_limit_identifier"] for s in seen] == [ALICE["id"]] * 3 + [CAROL["id"]]


# --------------------------------------------------------------------------- configuration


def test_anonymous_is_required_when_unknown_consumers_pass_as_anonymous(start_nginx, echo_upstream, standin_verifier):
    with pytest.raises(RuntimeError, match="anonymous is required"):
        start_nginx({"url": standin_verifier.url, "consumer_not_found": "anonymous"}, echo_upstream)


def test_consumer_not_found_takes_refuse_or_anonymous_only(start_nginx, echo_upstream, standin_verifier):
    with pytest.raises(RuntimeError, match="must be one of: refuse, anonymous"):
        start_nginx({"url": standin_verifier.url, "consumer_not_found": "continue"}, echo_upstream)
