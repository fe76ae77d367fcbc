"""Who may do what: roles from claims, route policies, assurance (RFC 9470), rate limits."""
