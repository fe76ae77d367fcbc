"""Names vulture (`python -m vulture`, configured in pyproject.toml) must not call dead in verifier/.

Parsed by vulture, never run. Every entry says why the name is alive though nothing in verifier/ uses it;
anything else vulture reports is dead code: delete it (or, if only tests use it, move it to tests/).
"""
# ruff: noqa

# Called by libraries, not by us: asyncio.Protocol, the httptools parser, logging, prometheus_client, fido2.
_.connection_made
_.data_received
_.connection_lost
_.on_message_begin
_.on_url
_.on_header
_.on_headers_complete
_.on_body
_.on_message_complete
_.format  # logging.Formatter
_.collect  # prometheus_client collector
_.ca_lookup  # fido2 AttestationVerifier
_.allowed_algorithms  # fido2 Fido2Server reads it

# Config keys read by name through the shared field reader (verifier.config.base.read_fields).
nonce_secret_env
poll_authorization_env
push_authorization_env
private_key_file  # upstream.identity_token
private_key_env
otlp_endpoint  # tracing: read into the exporter's URL by name

# Public API of the package used from outside verifier/: the Kong plugin (kong/python) and `verifier dev`'s
# identity provider, which the bench and the tests drive (revoke a token, count provider calls).
thumbprint_from_pem
_.revoke
_.reset_counts
_.introspection_calls
_.batch_calls
_.batch_tokens
_.tokens_asked

# The memory store's eviction count: how an operator (and the tests) see a table filling up.
_.evictions

# Read by the tests to prove a bound holds (the number of issuer-template tenants whose keys are kept).
_.tenants_held

# asyncio.Protocol / httptools parser callbacks of the introspection client, called by the loop and the parser.
_.eof_received
_.on_status

# Writing it is the point: a cached refusal drops its traceback (and the frames it keeps alive).
_.__traceback__

# grpc.aio calls it on the server stand-in the generated `add_*_to_server` functions are given.
_.add_registered_method_handlers

# Read by tests/doors/test_loop_clock.py: whether the door's loop clock still wakes the loop.
_.ticking

# Writing it is the point: a decision is built as its slots base, then made a `Decision` (`decision._built`).
_.__class__
