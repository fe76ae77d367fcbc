"""The compiled parts: the Envoy door's key (verifier/doors/_envoy_key.c) and the forward-auth door's parse of a whole
bodyless request (verifier/doors/_http_head.c). Everything else is in pyproject.toml.

Optional: where they cannot be built (no C compiler) the verifier runs the same key in pure Python
(verifier/doors/envoy_request.py) and parses every request with llhttp (httptools), slower;
tests/doors/test_envoy_request.py and tests/doors/test_http_head.py fail where they were not built, so CI never
measures or ships the slow path unnoticed.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "verifier.doors._envoy_key",
            sources=["verifier/doors/_envoy_key.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        ),
        Extension(
            "verifier.doors._http_head",
            sources=["verifier/doors/_http_head.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        ),
    ]
)
