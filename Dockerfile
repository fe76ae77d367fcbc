# Small, non-root image of the verifier.
FROM python:3.11-slim AS build
# gcc for the compiled parts (setup.py: the Envoy door's key, the forward-auth door's parse); the image that runs gets
# the wheel, not gcc
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY verifier ./verifier
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
  && python -c "import sys, zipfile, glob; w = glob.glob('/wheels/edge_verifier-*.whl')[0]; \
names = zipfile.ZipFile(w).namelist(); \
sys.exit(0 if all(any(m in n and n.endswith('.so') for n in names) for m in ('_envoy_key', '_http_head')) else 'no C parts')"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home verifier
COPY --from=build /wheels /wheels
COPY scripts/otel_proto.sh /tmp/otel_proto.sh
RUN pip install --no-cache-dir /wheels/* && rm -rf /wheels && bash /tmp/otel_proto.sh && rm /tmp/otel_proto.sh
USER 10001
EXPOSE 8080 50051 9464
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=1).status == 200 else 1)"
ENTRYPOINT ["verifier"]
CMD ["serve", "--config", "/etc/verifier/config.yaml"]
