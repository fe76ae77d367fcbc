"""`python -m fuzz TARGET [libFuzzer flags] [CORPUS_DIR ...]` runs one atheris target.

`python -m fuzz --list` names the targets. Run from the repository root with `PYTHONPATH=.:tests`
(the package lives in tests/fuzz; tokenkit, beside it, builds the fake provider).
"""

from __future__ import annotations

import sys


def main() -> None:
    """Parses the target name, instruments the verifier's modules, and hands the rest to libFuzzer."""
    from fuzz import targets

    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "--list"):
        print("targets:", " ".join(targets.TARGETS))
        return
    name = sys.argv.pop(1)
    if name not in targets.TARGETS:
        sys.exit(f"unknown target {name!r}; one of: {', '.join(targets.TARGETS)}")
    import atheris

    with atheris.instrument_imports(include=["verifier"]):
        targets.load()
        import verifier.binding.dpop
        import verifier.credentials
        import verifier.doors.envoy_request
        import verifier.doors.forward_auth
        import verifier.doors.grpc
        import verifier.doors.logout_http
        import verifier.doors.ssf_http
        import verifier.doors.webauthn_http
        import verifier.revocation.logout
        import verifier.revocation.service
        import verifier.revocation.ssf
        import verifier.revocation.subjects
        import verifier.settings
        import verifier.tokens.introspection
        import verifier.tokens.introspection_client
        import verifier.tokens.introspection_http
        import verifier.tokens.jws
        import verifier.tokens.keys
        import verifier.webauthn.registration  # noqa: F401
    if not any(not arg.startswith("-") for arg in sys.argv[1:]):
        # No corpus directory given: start from the target's seeds in a throw-away one.
        import tempfile
        from pathlib import Path

        corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
        for i, seed in enumerate(targets.seeds(name)):
            (corpus / f"seed-{i}").write_bytes(seed)
        sys.argv.append(str(corpus))
    atheris.Setup(sys.argv, targets.run_one(name))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
