# iumask with its CLI as the entrypoint (docs/docker.md). CPU by default:
#   docker build -t iumask .
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/data:/data" -v "$PWD/runs:/runs" iumask run --out /runs/demo
# GPU: torch and torchvision from a CUDA index, and run with --gpus all:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t iumask:cuda .
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD/data:/data" -v "$PWD/runs:/runs" iumask:cuda ...
# Reproducible: a pinned base image, and constraints.txt pins every dependency except torch and
# torchvision, which come from TORCH_INDEX.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
FROM ${PYTHON_IMAGE}

# Where torch and torchvision come from: https://download.pytorch.org/whl/cpu (no CUDA packages),
# or a CUDA index (https://download.pytorch.org/whl/cu124, ...) for GPUs.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# Debian packages: the pinned base image fixes the release (bookworm); exact versions would break
# as soon as Debian publishes a security fix.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/iumask
# Not pinned on purpose: the index decides which torch builds exist (CPU, each CUDA version).
# hadolint ignore=DL3013
RUN pip install --index-url "$TORCH_INDEX" torch torchvision
COPY pyproject.toml README.md constraints.txt ./
COPY iumask ./iumask
RUN pip install --constraint constraints.txt . \
    && python -c "import torch, torchvision, iumask; print('torch', torch.__version__, 'iumask', iumask.__version__)"
# The example specs, so that `iumask experiment /opt/iumask/examples/camvid/experiment.toml --data /data/camvid` works.
COPY examples ./examples

# A non-root user (uid 1000). Run with --user "$(id -u):$(id -g)" so that files written into mounted
# folders belong to you; any uid can write the caches (iumask's class counts, downloaded encoder
# weights, matplotlib's font cache) under /cache, which can be mounted too to keep them.
RUN useradd --create-home --uid 1000 --user-group iumask \
    && mkdir -p /data /runs /cache \
    && chmod 1777 /data /runs /cache
ENV XDG_CACHE_HOME=/cache \
    IUMASK_CACHE=/cache/iumask \
    MPLCONFIGDIR=/cache/matplotlib
USER 1000:1000

# Mount datasets on /data and outputs on /runs (the working folder: relative --out paths land there).
WORKDIR /runs
ENTRYPOINT ["iumask"]
CMD ["--help"]
