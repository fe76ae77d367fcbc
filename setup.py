"""The one compiled part: the Envoy door's key (verifier/doors/_envoy_key.c). Everything else is in pyproject.toml.

Optional: where it cannot be built (no C compiler) the verifier runs the same key in pure Python
(verifier/doors/envoy_request.py), slower; tests/doors/test_envoy_request.py fails where it was not built, so CI
never measures or ships the slow one unnoticed.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "verifier.doors._envoy_key",
            sources=["verifier/doors/_envoy_key.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        )
    ]
)
