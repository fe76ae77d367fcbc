"""Edge token verifier: decides, before any upstream runs, whether a request's credentials are good."""

__version__ = "0.1.0"
