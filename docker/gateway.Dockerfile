# The gateway image: DICOM receive, study assembly, dispatch and the web service. No torch, no GPU.
# Build from the repository root (docker/compose.yaml does):
#   docker build -f docker/gateway.Dockerfile -t pacs-triage-gateway .
# Its entrypoint is the README's command, `pacs-triage`; the default command is `pacs-triage gateway`,
# and the same image serves `pacs-triage serve-http`.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PACS_TRIAGE_CONFIG=/opt/pacs-triage/configs/default.yaml \
    PACS_TRIAGE_GATEWAY__DATA_DIR=/var/lib/pacs-triage \
    PACS_TRIAGE_LOGGING__JSON_OUTPUT=true

WORKDIR /opt/pacs-triage
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY plugins/ plugins/
COPY workers/ workers/
COPY configs/ configs/
# The `http` extra brings the web service and Celery (the gateway queues studies through it).
RUN pip install ".[http]" \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/pacs-triage pacs \
    && mkdir -p /var/lib/pacs-triage \
    && chown pacs:pacs /var/lib/pacs-triage

USER pacs
# The spool, the journal, the results and the outputs: mount a volume here and keep it.
VOLUME ["/var/lib/pacs-triage"]
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=15s --start-period=20s --retries=3 CMD ["pacs-triage", "echo"]
ENTRYPOINT ["pacs-triage"]
CMD ["gateway"]
