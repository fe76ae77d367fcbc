"""Errors an operator can act on: a busy port is one line naming the key or flag; check-config names every problem."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from doorkit import free_port

REPO = Path(__file__).resolve().parents[1]


def _verifier(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    try:
        return subprocess.run(
            [sys.executable, "-m", "verifier", *args], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as exc:  # the old code restarted a crashing worker forever
        pytest.fail(f"verifier {' '.join(args)} did not exit: {exc.stderr!r}")


@pytest.fixture
def taken() -> socket.socket:
    """A loopback port held by another program (no SO_REUSEPORT), as an operator would meet it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


ISSUER = {"issuer": "http://127.0.0.1:9", "audiences": ["a"], "algorithms": ["ES256"], "allow_insecure_http": True}


def _config(tmp_path: Path, settings: dict[str, object]) -> str:
    path = tmp_path / "verifier.yaml"
    path.write_text(yaml.safe_dump({"issuers": [ISSUER], **settings}))
    return str(path)


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_serve_with_a_busy_port_says_which_key_to_change(tmp_path: Path, taken: socket.socket) -> None:
    port = taken.getsockname()[1]
    config = _config(
        tmp_path, {"http": {"listen": f"127.0.0.1:{port}"}, "grpc": {"listen": f"127.0.0.1:{free_port()}"}}
    )
    result = _verifier("serve", "--config", config)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert f"127.0.0.1:{port}" in line and "http.listen" in line and "in use" in line


@pytest.fixture
def shared() -> socket.socket:
    """A loopback port listened on WITH SO_REUSEPORT, as another running verifier holds its ports."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_serve_refuses_a_port_another_verifier_shares(tmp_path: Path, shared: socket.socket) -> None:
    """Joining it would split the gateway's connections between two configurations (a stale or foreign
    verifier answering part of the traffic): the second one must refuse to start, not join."""
    port = shared.getsockname()[1]
    config = _config(tmp_path, {"http": {"listen": f"127.0.0.1:{port}"}})
    result = _verifier("serve", "--config", config, timeout=15)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert f"127.0.0.1:{port}" in line and "http.listen" in line and "in use" in line


def test_serve_refuses_an_admin_port_another_verifier_shares(tmp_path: Path, shared: socket.socket) -> None:
    """The workers bind `admin.listen` with SO_REUSEPORT: joining another verifier's admin port would hand part of
    the operator's kill-switch requests to it. Refused before any worker starts, naming the key."""
    port = shared.getsockname()[1]
    config = _config(
        tmp_path,
        {"http": {"listen": f"127.0.0.1:{free_port()}"}, "admin": {"listen": f"127.0.0.1:{port}"}, "revocation": {}},
    )
    result = _verifier("serve", "--config", config, timeout=15)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert f"127.0.0.1:{port}" in line and "admin.listen" in line and "in use" in line


def test_serve_names_the_metrics_port_of_a_later_worker(tmp_path: Path) -> None:
    base = free_port()
    with socket.socket() as sock:  # worker 1's metrics port (base + 1) is taken
        try:
            sock.bind(("127.0.0.1", base + 1))
        except OSError:
            pytest.skip("the neighbouring port is taken already")
        sock.listen()
        config = _config(
            tmp_path,
            {"workers": 2, "http": {"listen": f"127.0.0.1:{free_port()}"}, "metrics": {"listen": f"127.0.0.1:{base}"}},
        )
        result = _verifier("serve", "--config", config)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert f"127.0.0.1:{base + 1}" in line and "metrics.listen" in line and "worker 1" in line


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port", "--metrics-port", "--issuer-port"])
def test_dev_with_a_busy_port_names_the_flag(flag: str, taken: socket.socket) -> None:
    ports = {f: str(free_port()) for f in ("--http-port", "--grpc-port", "--metrics-port", "--issuer-port")}
    ports[flag] = str(taken.getsockname()[1])
    result = _verifier("dev", *[x for pair in ports.items() for x in pair])
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert f"127.0.0.1:{ports[flag]}" in line and flag in line


EVERY_PROBLEM = {
    "typos-and-types": (
        {
            "http": {"listen": "127.0.0.1:8080"},
            "issuers": [
                {
                    "issuer": "http://127.0.0.1:9400",
                    "audience_list": ["https://api.example.test"],
                    "algorithms": ["ES256"],
                    "leeway_seconds": "30",
                }
            ],
            "cache": {"token_entrys": 5},
            "edge_cache": {"max_age_seconds": -1},
            "worker": 2,
        },
        [
            "issuers[0].audience_list: unknown key (did you mean audiences?)",
            "issuers[0].leeway_seconds: expected an integer",
            "cache.token_entrys: unknown key (did you mean token_entries?)",
            "edge_cache.max_age_seconds: -1 is outside",
            "worker: unknown key (did you mean workers?)",
        ],
    ),
    "a-bad-url-first": (
        {
            "http": {"listen": "127.0.0.1:8080"},
            "issuers": [{"issuer": "http://idp.example.test", "audiences": ["a"], "algorithms": ["ES256"], "leway": 1}],
            "realm": 7,
        },
        [
            "issuers[0].issuer: https is required for a non-loopback issuer",
            "issuers[0].leway: unknown key (did you mean leeway_seconds?)",
            "realm: expected a non-empty string",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(EVERY_PROBLEM))
def test_check_config_reports_every_problem_with_suggestions(case: str, tmp_path: Path) -> None:
    settings, expected = EVERY_PROBLEM[case]
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(settings))
    result = _verifier("check-config", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    for text in expected:
        assert any(text in line and line.startswith("config error: ") for line in lines), (text, result.stderr)


def test_check_config_unknown_key_without_a_near_one(tmp_path: Path) -> None:
    config = _config(tmp_path, {"http": {"listen": "127.0.0.1:8080"}, "zzzz": 1})
    result = _verifier("check-config", config)
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: zzzz: unknown key"


def test_a_problem_in_an_optional_section_does_not_hide_the_others(tmp_path: Path) -> None:
    config = _config(tmp_path, {"http": {"listen": "127.0.0.1:8080"}, "dpop": {"no_such_dpop_key": 1}, "realm": 7})
    result = _verifier("check-config", config)
    assert result.returncode == 2
    assert "dpop" in result.stderr and "realm: expected a non-empty string" in result.stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_webauthn_registry_that_cannot_be_written_is_refused_by_check_config_and_serve_alike(
    tmp_path: Path, command: str
) -> None:
    """`webauthn.storage.sqlite_path` was opened only by the worker: check-config said ok, and serve restarted
    a worker that crashed on it once a second, forever, instead of exiting with the key named."""
    (tmp_path / "a-file").write_text("")
    config = _config(
        tmp_path,
        {
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "webauthn": {
                "rp_id": "localhost",
                "origins": ["http://localhost:9555"],
                "storage": {"sqlite_path": str(tmp_path / "a-file" / "webauthn.sqlite3")},
            },
        },
    )
    args = ("check-config", config) if command == "check-config" else ("serve", "--config", config)
    result = _verifier(*args, timeout=20)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "webauthn.storage.sqlite_path" in line and "writable" in line


@pytest.mark.parametrize("name", ["revocations.sqlite3", "replay.sqlite3-wal"])
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_state_file_that_cannot_be_opened_is_refused_by_check_config_and_serve_alike(
    tmp_path: Path, command: str, name: str
) -> None:
    """A file of the durable store in `state.path` that the worker cannot open (a directory in its place, a
    file another user owns): check-config said ok, and serve restarted a worker crashing on it forever."""
    state = tmp_path / "state"
    (state / name).mkdir(parents=True)
    config = _config(
        tmp_path,
        {
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "state": {"path": str(state)},
            "revocation": {"max_token_lifetime_seconds": 86400},
        },
    )
    args = ("check-config", config) if command == "check-config" else ("serve", "--config", config)
    result = _verifier(*args, timeout=20)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "state.path" in line and name in line


@pytest.mark.parametrize("planted", ["symlink", "foreign"])
def test_a_state_file_another_user_could_have_planted_is_refused(tmp_path: Path, planted: str) -> None:
    """state.path in a directory others can write (/tmp, an emptyDir is 0777): another user makes
    revocations.sqlite3 first, or a link named so to a file of theirs, and the verifier kept its kill switch in
    a file that user can rewrite (an entry deleted lifts the revocation)."""
    state = tmp_path / "state"
    state.mkdir()
    theirs = tmp_path / "theirs.sqlite3"
    theirs.write_bytes(b"")
    if planted == "symlink":
        (state / "revocations.sqlite3").symlink_to(theirs)
    else:
        if os.geteuid() != 0:
            pytest.skip("making a file another user owns needs root")
        (state / "revocations.sqlite3").write_bytes(b"")
        os.chown(state / "revocations.sqlite3", 65534, 65534)
    config = _config(
        tmp_path,
        {
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "state": {"path": str(state)},
            "revocation": {"max_token_lifetime_seconds": 86400},
        },
    )
    result = _verifier("check-config", config)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "state.path" in line and "revocations.sqlite3" in line


def test_check_config_warns_of_a_static_jwks_with_two_keys_of_one_type_under_one_kid(tmp_path: Path) -> None:
    """Start-up refuses tokens naming such a kid (`jwks_kid_ambiguous`: which key signed is not ours to guess);
    check-config, which an operator runs before deploying, says so for a static JWKS, and not for one key listed
    twice."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    one, other = (ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True) for _ in "ab")
    for keys, expected in (([one, other], ["dup"]), ([one, one], [])):
        jwks = {"keys": [{**k, "kid": "dup"} for k in keys] + [{**other, "kid": "fine"}]}
        path = tmp_path / "verifier.yaml"
        config = {"issuers": [{**ISSUER, "jwks_inline": jwks}], "http": {"listen": "127.0.0.1:0"}}
        path.write_text(yaml.safe_dump(config))
        result = _verifier("check-config", str(path))
        assert result.returncode == 0, result.stderr
        warned = [line for line in result.stderr.splitlines() if "jwks_kid_ambiguous" in line]
        assert [line.rpartition(": ")[2] for line in warned] == expected, result.stderr


@pytest.mark.parametrize("keys", [4, 5])
def test_check_config_warns_of_a_static_jwks_where_a_token_without_kid_is_refused(keys: int, tmp_path: Path) -> None:
    """A static JWKS (`jwks_inline`, `jwks_file`) with more ES256 keys than a kid-less token is tried against: start-up
    logs `jwks_kidless_ambiguous`, and check-config, which an operator runs before deploying, said only "ok"."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    public = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(keys)]
    jwks = {"keys": [{**ECAlgorithm.to_jwk(k, as_dict=True), "kid": f"k{i}"} for i, k in enumerate(public)]}
    path = tmp_path / "verifier.yaml"
    path.write_text(yaml.safe_dump({"issuers": [{**ISSUER, "jwks_inline": jwks}], "http": {"listen": "127.0.0.1:0"}}))
    result = _verifier("check-config", str(path))
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "jwks_kidless_ambiguous" in line]
    if keys <= 4:
        assert not warned, result.stderr
    else:
        assert warned == [
            f"warning: issuers[{ISSUER['issuer']}]: the JWKS holds 5 keys for ES256, more than 4: a token without a "
            "kid is refused (key_unknown), whichever key signed it; tokens with a kid are not affected. Have the "
            "provider put a kid in its tokens, or publish fewer keys (jwks_kidless_ambiguous)"
        ], result.stderr
