# Tollgate image: the proxy only. Postgres and Redis come from docker-compose
# (or any managed service) through DATABASE_URL and REDIS_URL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN useradd --create-home --uid 10001 tollgate
WORKDIR /srv/tollgate

COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
# The contract artifacts: a dev chain is deployed from them, and the chain client binds them.
COPY contracts/artifacts ./contracts/artifacts
RUN pip install --no-compile -e .
# The state dir (JWT secret, dev chain deployment record) lives on a volume, so a
# recreated container keeps its keys and finds the contracts it deployed.
RUN mkdir -p /var/lib/tollgate && chown tollgate /var/lib/tollgate
ENV TOLLGATE_STATE_DIR=/var/lib/tollgate
VOLUME /var/lib/tollgate

USER tollgate
EXPOSE 8402
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8402/health/ready', timeout=2).status == 200 else 1)"
CMD ["sh", "-c", "tollgate migrate && exec tollgate serve --host 0.0.0.0 --port 8402 --workers ${TOLLGATE_WORKERS:-2}"]
