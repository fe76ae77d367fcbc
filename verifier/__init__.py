"""Edge token verifier: decides, before any upstream runs, whether a request's credentials are good."""

from verifier import native

__version__ = "0.1.0"

native.guard()  # a compiled module (scripts/build_native.py) never runs code older than its source
