# One image for every paysaga process; the command chooses the role:
#   api        uvicorn --factory api.app:app_from_environment --host 0.0.0.0 --port 8000
#   worker     python -m worker
#   intake     python -m intake
#   jobs       python -m infra.provision database|topics|search-attributes
# See docker-compose.yml and docs/deployment.md.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/paysaga
WORKDIR /src
# Dependencies first: they change far less often than the code, so this layer stays cached.
COPY pyproject.toml README.md ./
COPY domain/ domain/
COPY service/ service/
COPY workflows/ workflows/
COPY activities/ activities/
COPY ledger/ ledger/
COPY api/ api/
COPY infra/ infra/
COPY checker/ checker/
COPY bench/ bench/
COPY cli/ cli/
COPY intake/ intake/
COPY sandboxes/ sandboxes/
COPY settings.py worker.py ./
RUN /opt/paysaga/bin/pip install . \
 && /opt/paysaga/bin/python -c "import api.app, worker, intake, infra.provision"

FROM python:3.11.13-slim-bookworm
ENV PATH=/opt/paysaga/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PAYSAGA_HOME=/var/lib/paysaga \
    PAYSAGA_LOG_JSON=true \
    PAYSAGA_METRICS_HOST=0.0.0.0
# A fixed, unprivileged uid: file ownership and pod security policies can name it.
RUN groupadd --system --gid 10001 paysaga \
 && useradd --system --uid 10001 --gid paysaga --home-dir /var/lib/paysaga --create-home \
    --shell /usr/sbin/nologin paysaga
COPY --from=build /opt/paysaga /opt/paysaga
USER 10001:10001
WORKDIR /var/lib/paysaga
# 8000: API; 9463: the API's /metrics; 9464: worker/intake /metrics; 9465: Temporal SDK metrics.
EXPOSE 8000 9463 9464 9465
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["uvicorn", "--factory", "api.app:app_from_environment", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
