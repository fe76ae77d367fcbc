"""Access tokens: JWS parsing, issuer keys, JWT verification and the verified-token caches."""
