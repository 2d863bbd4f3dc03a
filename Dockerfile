# syntax=docker/dockerfile:1
# sglora API image for a CUDA host.
#
# Base: the official PyTorch runtime image, pinned exactly. It ships torch 2.14.1+cu130 and torchvision 0.29.1,
# the pair pyproject.toml pins, with CUDA 13.0 and cuDNN 9 (the same wheels as a local `pip install`), in
# Ubuntu's system Python (no conda). Pin by digest too once you have pulled it (`FROM ...@sha256:...`).
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

# The image is the environment: pip installs into the base image's Python, which Ubuntu marks externally
# managed (PEP 668), so say so explicitly instead of layering a second interpreter on top.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/sglora

# 1) Dependencies, in their own layer so code edits don't reinstall them. They are read from pyproject.toml
#    (the one list) and installed under a constraints file that freezes torch/torchvision at exactly the builds
#    the base image ships: pyproject's `torch==2.14.1` is satisfied by the installed `2.14.1+cu130`, so pip keeps
#    the CUDA build instead of pulling another multi-GB wheel; if pyproject's pin ever moves away from the base
#    image, pip reports a conflict and the build fails here, loudly, rather than shipping a second torch.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && python -c "import torch, torchvision; print(f'torch=={torch.__version__}\ntorchvision=={torchvision.__version__}')" \
        > /tmp/constraints.txt \
    && pip install --requirement /tmp/requirements.txt --constraint /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt

# 2) The project itself, without dependencies (already there). Editable, so the installed distribution and the
#    code uvicorn imports are the same files (model configs ship as package data either way).
COPY README.md ./
COPY app ./app
COPY offline ./offline
RUN pip install --no-deps --editable . \
    && python -c "import torch, open_clip, faiss, app.ml.lora, app.ml.store; assert torch.__version__ == '2.14.1+cu130', torch.__version__; assert 'tiny_clip' in open_clip.list_models()"

# Unprivileged runtime user. The model store is mounted read-only; the only writable place it needs is a cache
# for open_clip/Hugging Face downloads when a store names a pretrained tag instead of bundling weights.
RUN groupadd --system --gid 10001 sglora \
    && useradd --no-log-init --system --uid 10001 --gid 10001 --create-home --home-dir /home/sglora sglora
ENV HOME=/home/sglora \
    HF_HOME=/home/sglora/.cache/huggingface \
    SGLORA_STORE_PATH=/srv/model_store
# Numeric, so the runtime (and Kubernetes' runAsNonRoot) can verify it is not root without reading /etc/passwd.
USER 10001:10001

EXPOSE 8000

# Ready = store, model and index loaded and warmed up (503 before). No curl in the image: use its Python.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"]

# One process per container: the model and store are loaded once per process (lifespan); scale with replicas.
# `python -m app` is uvicorn with a graceful shutdown: on SIGTERM readiness turns 503, it serves
# SGLORA_SHUTDOWN_DELAY_S more, then drains in-flight requests for up to SGLORA_SHUTDOWN_GRACE_S (give the
# container a stop grace period longer than both). Fewer glibc arenas keep resident memory near steady state.
ENV MALLOC_ARENA_MAX=2
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]
