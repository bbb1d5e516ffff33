# The GPU worker image: the models on CUDA, the SR and heatmap outputs, and delivery to the PACS.
# The host needs an NVIDIA driver and the NVIDIA Container Toolkit. Build from the repository root:
#   docker build -f docker/worker-gpu.Dockerfile -t pacs-triage-worker-gpu .
# Another torch/torchvision pair (another CUDA):  --build-arg PACS_TRIAGE_TORCH="torch==X torchvision==Y"
# Its entrypoint is the README's command, `pacs-triage`; the default command is
# `pacs-triage worker --queues analysis --device cuda:0`.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PACS_TRIAGE_CONFIG=/opt/pacs-triage/configs/default.yaml \
    PACS_TRIAGE_GATEWAY__DATA_DIR=/var/lib/pacs-triage \
    PACS_TRIAGE_WORKER__DEVICE=cuda:0 \
    PACS_TRIAGE_LOGGING__JSON_OUTPUT=true

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/pacs-triage
# The torch pair first, pinned as .ci/bootstrap pins it, in a layer of its own: it is large and
# is reused as long as the pair does not change.
ARG PACS_TRIAGE_TORCH=""
COPY .ci/constraints.txt .ci/constraints.txt
RUN if [ -n "$PACS_TRIAGE_TORCH" ]; then printf '%s\n' $PACS_TRIAGE_TORCH > .ci/constraints.txt; fi \
    && pip install -c .ci/constraints.txt torch torchvision

COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY plugins/ plugins/
COPY workers/ workers/
COPY configs/ configs/
RUN pip install -c .ci/constraints.txt ".[ml,http]" \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/pacs-triage pacs \
    && mkdir -p /var/lib/pacs-triage /opt/pacs-triage/plugins.d /models \
    && chown pacs:pacs /var/lib/pacs-triage

USER pacs
VOLUME ["/var/lib/pacs-triage"]
ENTRYPOINT ["pacs-triage"]
CMD ["worker", "--queues", "analysis", "--device", "cuda:0"]
