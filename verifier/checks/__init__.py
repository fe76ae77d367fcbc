"""The checks run on a verified principal, in the order the composition root lists them (see `base`)."""

from verifier.checks.base import NO_POLICY, OWN_ENDPOINT, Check, Route

__all__ = ["NO_POLICY", "OWN_ENDPOINT", "Check", "Route"]
