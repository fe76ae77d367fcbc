"""Revocation at the edge: SSF/CAEP/RISC events and the operator's kill switch, checked on every decision.

The composition root builds one `RevocationService`; the pipeline asks `service.revocations.check()`
(refusal or None) and `service.revocations.overrides()` (the claims announcements that reach the token, applied
as their transmitter's `claims_change` says by `verifier.checks.revocation`) on every decision.
"""

from verifier.config.revocation import RevocationConfig, TransmitterConfig, parse_revocation_config
from verifier.revocation.index import Revocations, TokenRevoked
from verifier.revocation.service import RevocationService

__all__ = [
    "RevocationConfig",
    "RevocationService",
    "Revocations",
    "TokenRevoked",
    "TransmitterConfig",
    "parse_revocation_config",
]
