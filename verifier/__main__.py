"""`python -m verifier` is the same as the `verifier` console script."""

from verifier.cli import main

raise SystemExit(main())
