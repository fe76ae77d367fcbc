"""Sender-constrained access tokens: proof that the caller holds the key the token is bound to.

`dpop` checks DPoP proofs (RFC 9449, `cnf.jkt`); `mtls` checks certificate-bound tokens (RFC 8705,
`cnf["x5t#S256"]`) against the client certificate the gateway saw.
"""
