# Spendgate gateway image: `spendgate serve` (mitmproxy embedded) with the config at
# /etc/spendgate/spendgate.toml. Build: docker build -t spendgate .
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TIKTOKEN_CACHE_DIR=/opt/spendgate/tiktoken \
    SPENDGATE_CONFIG=/etc/spendgate/spendgate.toml

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/spendgate --create-home spendgate \
 && mkdir -p /var/lib/spendgate/ca /etc/spendgate \
 && chown -R spendgate:spendgate /var/lib/spendgate

WORKDIR /opt/spendgate
COPY pyproject.toml ./
COPY addons ./addons
# The gateway never downloads tokenizer files at request time (it falls back to bytes / 4):
# bake the two encodings it uses into the image.
RUN pip install . \
 && python -c "import tiktoken; [tiktoken.get_encoding(n) for n in ('o200k_base', 'cl100k_base')]" \
 && python -O -m compileall -q "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && chmod -R a+rX /opt/spendgate
COPY deploy/spendgate/spendgate.toml /etc/spendgate/spendgate.toml

USER spendgate
WORKDIR /var/lib/spendgate
# 8080: the proxy (HTTPS_PROXY). 9464: GET /metrics for Prometheus.
EXPOSE 8080 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/metrics', timeout=2)"]
ENTRYPOINT ["spendgate"]
CMD ["serve"]
