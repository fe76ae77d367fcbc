"""The refusal-code catalogue: nothing refuses with a code it does not declare, and the docs follow it."""

from __future__ import annotations

import ast
import copy
import gc
import importlib
import pickle
import pkgutil
import re
from pathlib import Path

import pytest
from sourcetree import parse

import verifier
from verifier.decision import Decision
from verifier.doors.grpc import envoy_response
from verifier.doors.refusals import STATUS_BY_OUTCOME, answer_table, endpoint_answer, grpc_code, refuse, sheds
from verifier.errors import (
    Forbidden,
    InvalidToken,
    MalformedRequest,
    NotFound,
    Overloaded,
    RateLimited,
    Scheme,
    SenderConstraintFailed,
    VerifierError,
)
from verifier.reasons import ALLOW, CATALOGUE, Outcome
from verifier.revocation.entry import Effect

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "verifier"
README = ROOT / "README.md"
# `code=` arguments that are not string literals, each reviewed: where the value comes from.
DYNAMIC_CODES = {
    ("errors.py", "code"),  # the constructors' own pass-through
    ("webauthn/errors.py", "code"),
    ("revocation/index.py", "code"),
    ("revocation/index.py", "found.effect.value"),  # an Effect: see the Effect test below
    ("pipeline.py", "verified.reason"),  # a Decision's reason: checked by the autouse fixture in conftest
    ("webauthn/service.py", "_USER_REQUIRED"),  # a module constant: resolved below
}


def _all_modules() -> None:
    for info in pkgutil.walk_packages(verifier.__path__, "verifier."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


def _subclasses(cls: type[VerifierError]) -> list[type[VerifierError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def test_every_error_class_in_the_package_has_a_catalogued_code() -> None:
    _all_modules()
    gc.collect()  # a class refused at definition (the test below) may linger until collected
    classes = [VerifierError, *_subclasses(VerifierError)]
    assert len(classes) > 25
    assert [c.__qualname__ for c in classes if c.code not in CATALOGUE] == []


def _string_constants(tree: ast.Module) -> dict[str, str]:
    return {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def test_every_code_the_source_raises_is_catalogued() -> None:
    """Scans verifier/ for `code="..."` arguments and `code = "..."` class attributes."""
    literal: list[tuple[str, str]] = []
    dynamic: set[tuple[str, str]] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("v1/"):
            continue  # generated protobuf code
        tree = parse(path)
        constants = _string_constants(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if (
                        isinstance(item, ast.Assign)
                        and [t.id for t in item.targets if isinstance(t, ast.Name)] == ["code"]
                        and isinstance(item.value, ast.Constant)
                    ):
                        literal.append((rel, item.value.value))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
                for keyword in node.keywords:
                    if keyword.arg != "code":
                        continue
                    value = keyword.value
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        literal.append((rel, value.value))
                    elif isinstance(value, ast.Name) and value.id in constants:
                        literal.append((rel, constants[value.id]))
                        dynamic.add((rel, value.id))
                    elif not (rel.startswith("doors/") or rel.startswith("v1/")):
                        dynamic.add((rel, ast.unparse(value)))
    # Protobuf `Status(code=...)` and `HttpStatus(code=...)` in the doors are gRPC/HTTP numbers, not reasons.
    literal = [(rel, code) for rel, code in literal if not rel.startswith("doors/")]
    assert len(literal) > 40
    assert [(rel, code) for rel, code in literal if code not in CATALOGUE] == []
    assert dynamic <= DYNAMIC_CODES, f"review these and add them to DYNAMIC_CODES: {dynamic - DYNAMIC_CODES}"


def test_every_revocation_effect_that_refuses_is_catalogued() -> None:
    refusing = [e for e in Effect if e is not Effect.CLAIMS_OVERRIDE]
    assert [e.value for e in refusing if e.value not in CATALOGUE] == []


def test_an_uncatalogued_code_is_refused_at_construction_and_at_class_definition() -> None:
    with pytest.raises(ValueError, match="not in the catalogue"):
        InvalidToken("x", code="made_up_code")
    with pytest.raises(ValueError, match="not in the catalogue"):

        class Invented(VerifierError):
            code = "invented"


def test_a_code_decides_its_outcome_whatever_the_class() -> None:
    """Declared once: the class is how the code raises it, the catalogue is what it means."""
    for code, entry in CATALOGUE.items():
        error = VerifierError("x", code=code)
        assert (error.outcome, error.oauth_error, error.reusable) == (entry.outcome, entry.oauth_error, entry.reusable)
        assert refuse(error, realm="r").status == STATUS_BY_OUTCOME[entry.outcome]


def test_errors_are_immutable_and_changed_by_copy() -> None:
    error = SenderConstraintFailed("a DPoP-bound token needs its proof")
    with pytest.raises(AttributeError, match="immutable"):
        error.scheme = Scheme.DPOP  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        error.code = "forbidden"  # type: ignore[misc]
    dpop = error.replace(scheme=Scheme.DPOP)
    assert (dpop.scheme, error.scheme) == (Scheme.DPOP, Scheme.BEARER)
    assert type(dpop) is SenderConstraintFailed and dpop.code == error.code and str(dpop) == str(error)
    with pytest.raises(AttributeError):
        error.replace(no_such_field=1)
    with pytest.raises(AttributeError, match="new error"):
        error.replace(code="forbidden")  # the outcome follows the code: another code is another error
    for clone in (copy.copy(error), copy.deepcopy(error), pickle.loads(pickle.dumps(error))):
        assert (type(clone), clone.code, clone.description) == (SenderConstraintFailed, error.code, error.description)
        with pytest.raises(AttributeError, match="immutable"):
            clone.description = "changed"  # type: ignore[misc]
    limited = RateLimited(retry_after=3, headers=(("ratelimit", '"d";r=0;t=3'),))
    assert refuse(limited, realm="r").response_headers == (("retry-after", "3"), ("ratelimit", '"d";r=0;t=3'))


def test_the_scheme_is_a_constructor_argument() -> None:
    bearer = refuse(SenderConstraintFailed("mtls"), realm="r")
    dpop = refuse(SenderConstraintFailed("dpop", scheme=Scheme.DPOP), realm="r")
    assert dict(bearer.response_headers)["www-authenticate"].startswith("Bearer ")
    assert dict(dpop.response_headers)["www-authenticate"].startswith("DPoP ")


@pytest.mark.parametrize("code", sorted(CATALOGUE))
def test_every_code_gets_its_grpc_code_from_its_outcome_in_one_mapping(code: str) -> None:
    """Table-driven over the whole catalogue: Envoy's CheckResponse status follows the HTTP status."""
    from envoy.service.auth.v3 import external_auth_pb2 as ea

    decision = refuse(VerifierError("x", code=code), realm="r")
    expected = {401: 16, 403: 7, 429: 8, 503: 14, 400: 3, 404: 5, 409: 6}[decision.status]
    if CATALOGUE[code].outcome is Outcome.OVERLOADED:
        expected = 8  # RESOURCE_EXHAUSTED, and the call itself fails
    assert grpc_code(decision) == expected
    assert sheds(decision) is (code == "overloaded")
    answer = ea.CheckResponse.FromString(envoy_response(decision))
    assert (answer.status.code, answer.denied_response.status.code) == (expected, decision.status)


def _unchecked_decision(**values: object) -> Decision:
    """A Decision built around the conftest check (which would fail this test for its reason)."""
    return Decision(allowed=False, status=500, reason="internal_error")._replace(**values)  # `_replace` is not checked


def test_an_allow_is_ok_and_an_uncatalogued_reason_fails_closed() -> None:
    assert grpc_code(Decision(allowed=True, status=200, reason=ALLOW)) == 0
    assert grpc_code(_unchecked_decision(allowed=False, status=401, reason="nonsense")) == 14
    assert sheds(refuse(Overloaded(), realm="r"))


def test_our_endpoints_answer_through_the_same_mapping() -> None:
    missing = endpoint_answer(VerifierError("no", code="token_missing"), realm="verifier-admin")
    headers = dict(missing.headers)
    assert missing.status == 401 and headers["www-authenticate"] == 'Bearer realm="verifier-admin"'
    assert headers["x-verifier-reason"] == "token_missing" and headers["cache-control"] == "no-store"
    gone = endpoint_answer(NotFound("no such entry"), realm="r")
    assert gone.status == 404 and b'"error": "not_found"' in gone.body
    bad = endpoint_answer(MalformedRequest("body is not JSON"), realm="r")
    assert bad.status == 400 and b'"error": "invalid_request"' in bad.body
    refused = endpoint_answer(Forbidden("no", code="webauthn_user_required"), realm="r")
    assert refused.status == 403 and dict(refused.headers)["x-verifier-reason"] == "webauthn_user_required"


def test_the_readme_answer_table_is_generated_from_the_catalogue() -> None:
    """Regenerate with `python -m verifier.doors.refusals` and paste between the markers."""
    text = README.read_text()
    found = re.search(r"<!-- answers:begin .*?-->\n(.*?)<!-- answers:end -->", text, re.DOTALL)
    assert found is not None, "README.md lacks the <!-- answers:begin --> ... <!-- answers:end --> block"
    assert found.group(1) == answer_table(), "README.md's answer table is stale: python -m verifier.doors.refusals"
    for code in CATALOGUE:
        assert f"| `{code}` |" in found.group(1)


@pytest.mark.parametrize("package", ["revocation", "webauthn"])
def test_services_do_not_speak_http(package: str) -> None:
    """The handlers live in verifier/doors/; the services return values or raise catalogued errors."""
    offenders = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for node in ast.walk(parse(path)):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(("verifier.doors", "aiohttp.web"))]
            if isinstance(node, ast.Name) and node.id in ("HttpAnswer", "HttpRequest", "Router"):
                offenders.append(f"{path.name}: {node.id}")
    assert offenders == []


async def test_the_pipelines_refusals_are_answered_as_their_catalogue_entries_say() -> None:
    """Table-driven through a running verifier: each refusal's status, challenge error and reuse follow its code."""
    from doorkit import running_verifier

    from verifier.request import RequestAttributes

    async with running_verifier() as (app, idp):
        reuse = app.settings.edge_cache.refusal_max_age_seconds > 0
        good = idp.mint(sub="zoe")
        header, payload, _ = good.split(".")
        cases = {
            "token_missing": None,
            "invalid_request": "Bearer a b",
            "token_malformed": "Bearer not-a-jwt",
            "signature_invalid": f"Bearer {header}.{payload}.AAAA",
            "token_expired": f"Bearer {idp.mint(claims={'iat': 1_000_000, 'exp': 1_000_600})}",
            "audience_mismatch": f"Bearer {idp.mint(aud='https://elsewhere.test')}",
            "dpop_proof_invalid": f"DPoP {idp.mint(claims={'cnf': {'jkt': 'x' * 43}})}",
            "sender_constraint_failed": f"Bearer {idp.mint(claims={'cnf': {'jkt': 'x' * 43}})}",
        }
        for expected, authorization in cases.items():
            headers = {"authorization": authorization} if authorization else {}
            attrs = RequestAttributes(method="GET", scheme="https", host="api", path="/x", headers=headers)
            decision = await app.pipeline.decide(attrs, "test")
            assert decision.reason == expected, (expected, decision.reason)
            entry = CATALOGUE[decision.reason]
            assert decision.status == STATUS_BY_OUTCOME[entry.outcome]
            challenge = dict(decision.response_headers).get("www-authenticate", "")
            assert (f'error="{entry.oauth_error}"' in challenge) is (entry.oauth_error is not None), challenge
            assert (decision.cache_max_age > 0) is (entry.reusable and reuse)
