"""Coverage-guided fuzzing of the verifier's parsers and doors with atheris (see README.md)."""
